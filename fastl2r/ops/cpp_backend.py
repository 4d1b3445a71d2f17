"""The C++ (CPU) and CUDA backends: the ``fastl2r::`` operators of the compiled extension.

``csrc/`` declares the operators once (one folder per op: its schema, CPU and CUDA
kernels, Meta kernel); the dispatcher picks the kernel from the tensors' device, so
one module serves both backends (``fastl2r._C_cuda`` adds the CUDA kernels when it
is built).  Autograd is wired here, once, for every device: each forward operator
returns what its backward operator needs (the activated gates, ``tanh(z)``), saved
for the backward and dropped from what the caller sees.  The cotangent of an output
the loss does not use arrives as None and goes to the backward operator as None
(no zeros are made): its kernels read it as zero, as the Triton backend's do.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _C  # noqa: F401  (loading the extension registers the fastl2r:: operators)

_ops = torch.ops.fastl2r


def channel_means(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """``fastl2r.ops.channel_means`` on the compiled kernel of the activations' device."""
    return _ops.channel_means(list(activations))


def meta_lstm(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor,
              lstm: torch.Tensor, rows: Sequence[int], h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastl2r.ops.meta_lstm`` on the compiled kernels, without the gates saved for the backward."""
    h_new, c_new, _ = _ops.meta_lstm(w, g, a_row, a_shared, lstm, list(rows), h, c)
    return h_new, c_new


def gated_update(h3: torch.Tensor, head: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                 rows: Sequence[int], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``fastl2r.ops.gated_update`` on the compiled kernels, without the tanh(z) saved for the backward."""
    w_new, delta, _ = _ops.gated_update(h3, head, w, g, list(rows), float(lr))
    return w_new, delta


def _meta_lstm_setup(ctx, inputs, output) -> None:
    w, g, a_row, a_shared, lstm, rows, h, c = inputs
    h_new, c_new, gates = output
    ctx.rows = rows
    ctx.mark_non_differentiable(gates)
    ctx.set_materialize_grads(False)  # an unused output's cotangent stays None
    ctx.save_for_backward(w, g, a_row, a_shared, lstm, h, c, h_new, c_new, gates)


def _meta_lstm_backward(ctx, grad_h_new, grad_c_new, _grad_gates):
    w, g, a_row, a_shared, lstm, h, c, h_new, c_new, gates = ctx.saved_tensors
    grad_w, grad_lstm, grad_h, grad_c = _ops.meta_lstm_backward(
        grad_h_new, grad_c_new, w, g, a_row, a_shared, lstm, ctx.rows, h, c, h_new, c_new, gates)
    # g and the activation means are constants of the meta-gradient (see fastl2r.ops).
    return grad_w, None, None, None, grad_lstm, None, grad_h, grad_c


def _gated_update_setup(ctx, inputs, output) -> None:
    h3, head, w, g, rows, lr = inputs
    _, _, tanh_z = output
    ctx.rows, ctx.lr = rows, lr
    ctx.mark_non_differentiable(tanh_z)
    ctx.set_materialize_grads(False)  # an unused output's cotangent stays None
    ctx.save_for_backward(h3, head, g, tanh_z)


def _gated_update_backward(ctx, grad_w_new, grad_delta, _grad_tanh_z):
    h3, head, g, tanh_z = ctx.saved_tensors
    grad_h3, grad_head = _ops.gated_update_backward(grad_w_new, grad_delta, h3, head, g, ctx.rows, ctx.lr, tanh_z)
    return grad_h3, grad_head, grad_w_new, None, None, None


torch.library.register_autograd("fastl2r::meta_lstm", _meta_lstm_backward, setup_context=_meta_lstm_setup)
torch.library.register_autograd("fastl2r::gated_update", _gated_update_backward, setup_context=_gated_update_setup)
