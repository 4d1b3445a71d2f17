"""Plain-PyTorch reference of every fused op: the contract every backend matches.

It is also the CPU fallback and the eager baseline of every benchmark, so it is
written the naive way a user would: one meta-net (one tensor) at a time.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .layout import RMS_EPS, GroupDims, slot_count


def unpack_lstm(lstm: torch.Tensor, dims: GroupDims) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Views ``(w_ih [G,4H,in], w_hh [G,4H,H], b [G,4H])`` per cell of a ``[G, P_lstm]`` tensor."""
    if lstm.shape[-1] != dims.lstm_size:
        raise ValueError(f"lstm parameters have {lstm.shape[-1]} columns, expected {dims.lstm_size} for {dims}")
    G = lstm.shape[0]
    return [tuple(lstm[:, start:start + math.prod(shape)].reshape(G, *shape)
                  for start, shape in zip(offsets, (ih, hh, (n_bias,))))
            for offsets, (ih, hh, n_bias) in zip(dims.lstm_offsets(), dims.cell_shapes())]


def unpack_head(head: torch.Tensor, dims: GroupDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``(w_out [G,K,H], b_out [G,K], s [G])`` of a ``[G, P_head]`` tensor."""
    if head.shape[-1] != dims.head_size:
        raise ValueError(f"head parameters have {head.shape[-1]} columns, expected {dims.head_size} for {dims}")
    w_out, b_out, scale = dims.head_offsets()
    return head[:, w_out:b_out].reshape(head.shape[0], dims.K, dims.H), head[:, b_out:scale], head[:, scale]


def channel_means(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel means (dim 1) over every other dim, for each tensor, concatenated."""
    with torch.no_grad():
        return torch.cat([x.mean(dim=[d for d in range(x.dim()) if d != 1]) for x in activations])


def rms_normalise(x: torch.Tensor) -> torch.Tensor:
    """``x / (rms(x) + 1e-8)`` with the RMS over the whole block treated as a constant."""
    rms = x.detach().square().mean().sqrt()
    return x / (rms + RMS_EPS)


def lstm_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``torch.nn.LSTMCell`` step; ``bias`` may already hold a per-tensor input term."""
    gates = x @ w_ih.t() + h @ w_hh.t() + bias
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_new = torch.sigmoid(o) * torch.tanh(c_new)
    return h_new, c_new


def meta_features(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor) -> torch.Tensor:
    """Row features ``[w, g, a_row...]`` of one tensor, each block RMS-normalised over the tensor."""
    blocks = [rms_normalise(w), rms_normalise(g)]
    blocks += [rms_normalise(a_row[:, j:j + 1]) for j in range(a_row.shape[1])]
    return torch.cat(blocks, dim=1)


def meta_lstm(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor,
              lstm: torch.Tensor, rows: Sequence[int], h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the three stacked LSTM cells for every row of a group of meta-nets,
    for S episode slots at once (S = w's rows / sum(rows); S = 1 is one episode).

    w, g      [S·R, K]   student weights and gradients, R = sum(rows); tensor t holds the
                         S·rows[t] rows from S·(rows[0] + … + rows[t-1]), slot by slot
    a_row     [S·R, Ar]  per-row activation means (conv: output; GroupNorm: input, output)
    a_shared  [G·S, Ds]  per-(tensor, slot) activation means shared by its rows (conv: input)
    lstm      [G, P]     the meta-nets (layout.py), shared by the slots
    h, c      [3, S·R, H] per-cell recurrent state
    returns   (h_new, c_new) [3, S·R, H]; cells 1 and 2 feed ReLU(h) to the next cell.
    Every (tensor, slot) block of rows is RMS-normalised on its own: a slot is an episode.
    """
    dims = GroupDims.of(w, a_row, a_shared, h)
    cells = unpack_lstm(lstm, dims)
    slots = slot_count(rows, w.shape[0])
    h_out, c_out, start = [], [], 0
    for t, n_rows in enumerate(rows):
        for s in range(slots):
            r = slice(start, start + n_rows)
            start += n_rows
            x = meta_features(w[r], g[r], a_row[r])
            hs, cs = [], []
            for k, (w_ih, w_hh, b) in enumerate(cells):
                w_in, bias = w_ih[t], b[t]
                if k == 0 and dims.Ds:
                    # The shared block is the same for every row: one mat-vec per (tensor, slot).
                    bias = bias + w_in[:, dims.Dr:] @ rms_normalise(a_shared[t * slots + s])
                    w_in = w_in[:, : dims.Dr]
                h_new, c_new = lstm_cell(x, h[k, r], c[k, r], w_in, w_hh[t], bias)
                hs.append(h_new)
                cs.append(c_new)
                x = F.relu(h_new)
            h_out.append(torch.stack(hs))
            c_out.append(torch.stack(cs))
    return torch.cat(h_out, dim=1), torch.cat(c_out, dim=1)


def gated_update(h3: torch.Tensor, head: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                 rows: Sequence[int], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``δ = s·tanh(W_out h3 + b_out)`` per row, then ``w_new = w − lr·δ⊙g``.

    h3 [R, H], head [G, P_head] (layout.py), w and g [R, K]; ``rows[t]`` rows use head t
    (with S slots, ``ops.gated_update`` passes S·rows[t]); returns (w_new, δ), both [R, K].
    """
    dims = GroupDims(K=w.shape[1], Ar=0, Ds=0, H=h3.shape[1])
    w_out, b_out, scale = unpack_head(head, dims)
    deltas, start = [], 0
    for t, n_rows in enumerate(rows):
        r = slice(start, start + n_rows)
        start += n_rows
        deltas.append(scale[t] * torch.tanh(h3[r] @ w_out[t].t() + b_out[t]))
    delta = torch.cat(deltas)
    return w - lr * delta * g, delta
