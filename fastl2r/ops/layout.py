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

A group's rows: ``rows[t]`` rows per tensor for one episode slot; with S slots, tensor t holds
S·rows[t] rows, slot by slot (``slot_count``).

This is the one module the Triton kernels (``fastl2r.kernels``) share with the rest of fastl2r,
so it imports nothing from fastl2r: the layout, and the epsilon of the features' RMS scaling.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

NUM_CELLS = 3
RMS_EPS = 1e-8  # every feature block is divided by (its RMS + RMS_EPS)


@dataclass(frozen=True)
class GroupDims:
    """The static shape of one group's meta-nets."""

    K: int   # weights per row
    Ar: int  # per-row activation features
    Ds: int  # shared activation features (per tensor)
    H: int   # hidden size

    @property
    def D(self) -> int:
        """Input columns of cell 1: [w, g, per-row activations, shared activations]."""
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

    def lstm_offsets(self) -> list[tuple[int, int, int]]:
        """Per cell, where its w_ih, w_hh and b start in a row of the ``lstm`` matrix: the offsets the
        kernels read at, and ``reference.unpack_lstm``'s views."""
        offsets, start = [], 0
        for (ih, hh, n_bias) in self.cell_shapes():
            w_hh = start + ih[0] * ih[1]
            bias = w_hh + hh[0] * hh[1]
            offsets.append((start, w_hh, bias))
            start = bias + n_bias
        return offsets

    @property
    def lstm_size(self) -> int:
        """Columns of one meta-net's row of the ``lstm`` matrix."""
        return sum(a * b + c * d + n for (a, b), (c, d), n in self.cell_shapes())

    def head_offsets(self) -> tuple[int, int, int]:
        """Where w_out, b_out and s start in a row of the ``head`` matrix (the kernels' offsets)."""
        return 0, self.K * self.H, self.K * self.H + self.K

    @property
    def head_size(self) -> int:
        """Columns of one meta-net's row of the ``head`` matrix."""
        return self.K * self.H + self.K + 1

    @staticmethod
    def of(w: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor, h: torch.Tensor) -> "GroupDims":
        """The dims of a meta_lstm call, read from its arguments' shapes."""
        return GroupDims(K=w.shape[1], Ar=a_row.shape[1], Ds=a_shared.shape[1], H=h.shape[-1])


def slot_count(rows: Sequence[int], total_rows: int) -> int:
    """How many episode slots a group of ``total_rows`` rows holds (``rows`` counts one slot's)."""
    per_slot = sum(rows)
    if per_slot <= 0 or total_rows % per_slot:
        raise ValueError(f"rows {list(rows)} (one slot) do not divide the group's {total_rows} rows")
    return total_rows // per_slot
