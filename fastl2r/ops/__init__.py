"""The fused operations of fastl2r, one function each.

Everything above this package calls these functions and gets the fastest correct
backend for the tensors' device (see ``registry``).  Inputs are checked here, once,
for every backend; gradients, activations and other features are constants of the
meta-gradient, so they are detached here too.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .layout import NUM_CELLS, GroupDims, unpack_head, unpack_lstm
from .registry import BACKENDS, BackendError, backend_for, backend_name, requested_backend, use_backend

__all__ = [
    "channel_means", "meta_lstm", "gated_update", "GroupDims", "unpack_lstm", "unpack_head",
    "NUM_CELLS", "BACKENDS", "BackendError", "backend_for", "backend_name", "requested_backend",
    "use_backend",
]


def channel_means(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel means over every dim but 1 of each activation, concatenated: ``[sum C_l]``.

    One call for the whole list (one launch on the fused backends).  No gradient.
    """
    activations = list(activations)
    if not activations:
        raise ValueError("channel_means needs at least one activation")
    first = activations[0]
    for x in activations:
        if x.dim() < 2:
            raise ValueError(f"channel_means: activations need a channel dim 1, got shape {tuple(x.shape)}")
        if x.device != first.device or x.dtype != first.dtype:
            raise ValueError("channel_means: all activations must share one device and dtype")
    with torch.no_grad():  # the means are constants: nothing to record, nothing to detach
        return backend_for(first.device).channel_means(activations)


def _check_rows(rows: Sequence[int], total: int, groups: int) -> tuple[tuple[int, ...], int]:
    """``rows`` as ints, and the number of episode slots ``total`` rows hold."""
    rows = tuple(int(r) for r in rows)
    if len(rows) != groups or any(r <= 0 for r in rows) or total % sum(rows):
        raise ValueError(f"rows {list(rows)} must be {groups} positive counts whose sum divides the group's "
                         f"{total} rows (one per episode slot)")
    return rows, total // sum(rows)


def meta_lstm(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor,
              lstm: torch.Tensor, rows: Sequence[int], h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The three stacked meta-LSTM cells for every row of a group of meta-nets, for every
    episode slot (see reference: ``rows`` counts one slot's rows)."""
    G = lstm.shape[0]
    dims = GroupDims.of(w, a_row, a_shared, h)
    R = w.shape[0]
    rows, slots = _check_rows(rows, R, G)
    if g.shape != w.shape or a_row.shape[0] != R or a_shared.shape[0] != G * slots:
        raise ValueError(f"meta_lstm: inconsistent shapes w {tuple(w.shape)}, g {tuple(g.shape)}, "
                         f"a_row {tuple(a_row.shape)}, a_shared {tuple(a_shared.shape)} for {G} tensors "
                         f"and {slots} slots")
    if h.shape != (NUM_CELLS, R, dims.H) or c.shape != h.shape:
        raise ValueError(f"meta_lstm: state must be [{NUM_CELLS}, {R}, H], got h {tuple(h.shape)}, c {tuple(c.shape)}")
    if lstm.shape[1] != dims.lstm_size:
        raise ValueError(f"meta_lstm: lstm has {lstm.shape[1]} columns, expected {dims.lstm_size} for {dims}")
    return backend_for(w.device).meta_lstm(w, _constant(g), _constant(a_row), _constant(a_shared), lstm, rows, h, c)


def gated_update(h3: torch.Tensor, head: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                 rows: Sequence[int], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``δ = s·tanh(W_out h3 + b_out)``, ``w_new = w − lr·δ⊙g``; returns ``(w_new, δ)``.
    ``rows`` counts one slot's rows, as for ``meta_lstm``: tensor t's S·rows[t] rows use head t."""
    R, K = w.shape
    G = head.shape[0]
    if g.shape != w.shape or h3.dim() != 2 or h3.shape[0] != R:
        raise ValueError(f"gated_update: inconsistent shapes h3 {tuple(h3.shape)}, w {tuple(w.shape)}, g {tuple(g.shape)}")
    expected = GroupDims(K=K, Ar=0, Ds=0, H=h3.shape[1]).head_size
    if head.shape[1] != expected:
        raise ValueError(f"gated_update: head has {head.shape[1]} columns, expected {expected} (K={K}, H={h3.shape[1]})")
    rows, slots = _check_rows(rows, R, G)
    return backend_for(w.device).gated_update(h3, head, w, _constant(g), tuple(slots * r for r in rows), float(lr))


def _constant(x: torch.Tensor) -> torch.Tensor:
    """``x`` out of the graph (a constant of the meta-gradient); no dispatch when it is already."""
    return x.detach() if x.requires_grad else x
