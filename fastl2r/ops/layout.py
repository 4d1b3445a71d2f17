"""Memory layout of a group of meta-nets' parameters, shared by every backend.

A *group* is a set of G parameter tensors of the student whose meta-nets have the
same shape: rows of K weights, ``Ar`` per-row activation features, ``Ds`` shared
(per-tensor) activation features and hidden size H.  Each tensor's meta-net is one
row of two parameter matrices, so a whole group is two tensors:

``lstm [G, P_lstm]``, each row the concatenation (row-major) of
    w_ih1 [4H, D], w_hh1 [4H, H], b1 [4H],
    w_ih2 [4H, H], w_hh2 [4H, H], b2 [4H],
    w_ih3 [4H, H], w_hh3 [4H, H], b3 [4H]
with ``D = 2K + Ar + Ds`` and the input columns ordered
``[w (K), g (K), per-row activations (Ar), shared activations (Ds)]``;
gates in ``torch.nn.LSTMCell`` order (i, f, g, o); ``b`` is the sum of LSTMCell's
``bias_ih`` and ``bias_hh``.

``head [G, P_head]``, each row ``w_out [K, H], b_out [K], s [1]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

NUM_CELLS = 3


@dataclass(frozen=True)
class GroupDims:
    """The static shape of one group's meta-nets."""

    K: int   # weights per row
    Ar: int  # per-row activation features
    Ds: int  # shared activation features (per tensor)
    H: int   # hidden size

    @property
    def D(self) -> int:
        return 2 * self.K + self.Ar + self.Ds

    @property
    def Dr(self) -> int:
        """Input columns that differ from row to row."""
        return 2 * self.K + self.Ar

    def cell_shapes(self) -> list[tuple[tuple[int, int], tuple[int, int], int]]:
        """Per cell: (w_ih shape, w_hh shape, bias length)."""
        four_h = 4 * self.H
        ins = [self.D] + [self.H] * (NUM_CELLS - 1)
        return [((four_h, d), (four_h, self.H), four_h) for d in ins]

    @property
    def lstm_size(self) -> int:
        return sum(a * b + c * d + n for (a, b), (c, d), n in self.cell_shapes())

    @property
    def head_size(self) -> int:
        return self.K * self.H + self.K + 1

    @staticmethod
    def of(w: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor, h: torch.Tensor) -> "GroupDims":
        return GroupDims(K=w.shape[1], Ar=a_row.shape[1], Ds=a_shared.shape[1], H=h.shape[-1])


def unpack_lstm(lstm: torch.Tensor, dims: GroupDims) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Views ``(w_ih [G,4H,in], w_hh [G,4H,H], b [G,4H])`` per cell of a ``[G, P_lstm]`` tensor."""
    if lstm.shape[-1] != dims.lstm_size:
        raise ValueError(f"lstm parameters have {lstm.shape[-1]} columns, expected {dims.lstm_size} for {dims}")
    G = lstm.shape[0]
    cells, start = [], 0
    for (ih, hh, nb) in dims.cell_shapes():
        parts = []
        for shape in (ih, hh, (nb,)):
            n = 1
            for s in shape:
                n *= s
            parts.append(lstm[:, start:start + n].reshape(G, *shape))
            start += n
        cells.append(tuple(parts))
    return cells


def unpack_head(head: torch.Tensor, dims: GroupDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``(w_out [G,K,H], b_out [G,K], s [G])`` of a ``[G, P_head]`` tensor."""
    if head.shape[-1] != dims.head_size:
        raise ValueError(f"head parameters have {head.shape[-1]} columns, expected {dims.head_size} for {dims}")
    G, K, H = head.shape[0], dims.K, dims.H
    w_out = head[:, : K * H].reshape(G, K, H)
    b_out = head[:, K * H: K * H + K]
    scale = head[:, K * H + K]
    return w_out, b_out, scale
