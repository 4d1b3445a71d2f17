"""The Triton backend: the fused kernels of ``fastl2r.kernels`` behind the backend interface.

Each op is a ``torch.library`` op of the ``fastl2r_triton`` namespace with a fake kernel and
autograd, so ``torch.compile(fullgraph=True)`` traces through it: a ``triton_op`` whose kernel
launches Inductor sees (the meta-LSTM and the gated update, where the kernels are compiled), else
an opaque custom op (``fastl2r.kernels.define_op``).  The forward ops also return what their
backward reads (meta-LSTM gates and scales); this module hands back only the reference's
outputs.  An unused output's cotangent reaches the backward kernels as None (skipped), as in
the C++ backend.  On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``,
see ``fastl2r.ops``): slow, for tests.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fastl2r.kernels.channel_means import channel_means as _channel_means
from fastl2r.kernels.gated_update import gated_update as _gated_update
from fastl2r.kernels.meta_lstm import meta_lstm as _meta_lstm


def channel_means(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fastl2r.ops.channel_means`` in one Triton launch."""
    return _channel_means(list(activations))


def meta_lstm(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor,
              lstm: torch.Tensor, rows: Sequence[int], h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastl2r.ops.meta_lstm`` on the Triton kernels, without the gates and scales saved for the backward."""
    h_new, c_new, _, _ = _meta_lstm(w, g, a_row, a_shared, lstm, list(rows), h, c)
    return h_new, c_new


def gated_update(h3: torch.Tensor, head: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                 rows: Sequence[int], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastl2r.ops.gated_update`` on the Triton kernels."""
    return _gated_update(h3, head, w, g, list(rows), float(lr))
