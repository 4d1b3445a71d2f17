"""The gated update (DESIGN §1.3, §3.3): head GEMM, tanh, scale, ``δ ⊙ g`` and the step in one kernel.

``δ_r = s · tanh(W_out h3_r + b_out)``, ``w_new = w − lr · δ ⊙ g`` for every row of a group.

Forward, one launch: ``_forward_kernel``, grid ``(row blocks, K / Blocks.k)``; a program
multiplies a block of ``h3`` rows of one tensor by a ``[H, k]`` tile of that tensor's
``W_out`` and writes ``δ`` and ``w_new`` for that tile: ``h3``, ``W_out``, ``w`` and ``g``
read once, the two outputs written once, nothing in between.

Backward, two launches.  Nothing but the inputs is saved: the backward recomputes
``tanh(W_out h3 + b_out)`` (an ``[R, H] × [H, K]`` product over data it reads anyway)
rather than store an ``[R, K]`` tensor in the forward.

1. ``_backward_rows_kernel``, grid ``(row blocks,)``: per block, over every K tile, the
   gradient of the pre-activation ``dpre = (dδ − lr·dw_new⊙g)·s·(1 − tanh²)`` (written
   to a scratch ``[R, K]``), ``dh3 = dpre · W_out`` and, per row, ``Σ_k dδ_total·tanh``.
2. ``_backward_weights_kernel``, grid ``(G, K / Blocks.k)``: ``dW_out = dpreᵀ h3`` and
   ``db_out = Σ_rows dpre`` summed over the tensor's rows, and ``ds`` from the per-row sums
   (no atomics: deterministic).

The gradient of ``w`` is ``dw_new`` itself.  Arithmetic is in the compute dtype (float64 for
float64 tensors, else float32; ``tl.dot`` with ``input_precision="ieee"``: no TF32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastl2r.ops.layout import GroupDims

from . import (TL_DTYPES, cached_table, compute_dtype, define_op, new_output, next_pow2, row_block, row_blocks,
               row_offsets, tanh, wrap_triton)


@dataclass(frozen=True)
class Blocks:
    """Block sizes; any choice computes the same function (every edge is masked)."""

    rows: int = 16  # rows per program (tl.dot needs >= 16)
    k: int = 32     # weights (columns of w) per program or per step


GPU_BLOCKS = Blocks()
# The interpreter runs programs one after another, each op costing Python time: fewer, larger ones.
INTERPRETER_BLOCKS = Blocks(rows=64, k=128)


def default_blocks(device: torch.device) -> Blocks:
    """The block sizes for tensors on ``device``: the interpreter's on a CPU, the GPU's elsewhere."""
    return INTERPRETER_BLOCKS if device.type == "cpu" else GPU_BLOCKS


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _forward_kernel(h3, head, w, g, blocks, w_new, delta, step_size,
                    K: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr,
                    B_OUT: tl.constexpr, SCALE: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
                    BK: tl.constexpr):
    t, rows, row_mask, units, unit_mask = row_block(blocks, H, HP, BR)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    col_mask = cols < K
    params = head + t.to(tl.int64) * P
    x = tl.load(h3 + rows[:, None] * H + units[None, :], mask=row_mask[:, None] & unit_mask[None, :],
                other=0.0).to(ACC)
    w_out = tl.load(params + cols[None, :] * H + units[:, None], mask=unit_mask[:, None] & col_mask[None, :],
                    other=0.0).to(ACC)
    pre = tl.dot(x, w_out, input_precision="ieee", out_dtype=ACC)
    pre += tl.load(params + B_OUT + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    d = tl.load(params + SCALE).to(ACC) * tanh(pre)
    offsets = rows[:, None] * K + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(delta + offsets, d, mask=mask)
    step = d * tl.load(g + offsets, mask=mask, other=0.0).to(ACC)
    lr = tl.load(step_size)
    tl.store(w_new + offsets, tl.load(w + offsets, mask=mask, other=0.0).to(ACC) - lr * step, mask=mask)


@triton.jit
def _backward_rows_kernel(h3, head, g, blocks, dw_new, ddelta, dpre, dh3, row_sums, step_size,
                          K: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr,
                          B_OUT: tl.constexpr, SCALE: tl.constexpr, HAS_DW: tl.constexpr,
                          HAS_DDELTA: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    t, rows, row_mask, units, unit_mask = row_block(blocks, H, HP, BR)
    params = head + t.to(tl.int64) * P
    state = rows[:, None] * H + units[None, :]
    state_mask = row_mask[:, None] & unit_mask[None, :]
    x = tl.load(h3 + state, mask=state_mask, other=0.0).to(ACC)
    scale = tl.load(params + SCALE).to(ACC)
    lr = tl.load(step_size)
    dx = tl.zeros([BR, HP], dtype=ACC)
    row_sum = tl.zeros([BR], dtype=ACC)
    k_local = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        cols = k0 + k_local
        col_mask = cols < K
        w_out = tl.load(params + cols[None, :] * H + units[:, None], mask=unit_mask[:, None] & col_mask[None, :],
                        other=0.0).to(ACC)
        pre = tl.dot(x, w_out, input_precision="ieee", out_dtype=ACC)
        u = tanh(pre + tl.load(params + B_OUT + cols, mask=col_mask, other=0.0).to(ACC)[None, :])
        offsets = rows[:, None] * K + cols[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
        dd = tl.zeros([BR, BK], dtype=ACC)
        if HAS_DDELTA:
            dd += tl.load(ddelta + offsets, mask=mask, other=0.0).to(ACC)
        if HAS_DW:
            dd -= lr * tl.load(dw_new + offsets, mask=mask, other=0.0).to(ACC) * tl.load(
                g + offsets, mask=mask, other=0.0).to(ACC)
        row_sum += tl.sum(dd * u, axis=1)
        dp = dd * scale * (1.0 - u * u)
        tl.store(dpre + offsets, dp, mask=mask)
        dx = tl.dot(dp, tl.trans(w_out), dx, input_precision="ieee", out_dtype=ACC)
    tl.store(dh3 + state, dx, mask=state_mask)
    tl.store(row_sums + rows, row_sum, mask=row_mask)


@triton.jit
def _backward_weights_kernel(h3, dpre, row_sums, offsets, dhead,
                             K: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, P: tl.constexpr,
                             B_OUT: tl.constexpr, SCALE: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
                             BK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    col_mask = cols < K
    units = tl.arange(0, HP)
    unit_mask = units < H
    r0 = tl.load(offsets + t)
    r1 = tl.load(offsets + t + 1)
    local = tl.arange(0, BR)
    acc = tl.zeros([BK, HP], dtype=ACC)
    bias = tl.zeros([BK], dtype=ACC)
    for r in range(r0, r1, BR):
        rows = r + local
        row_mask = rows < r1
        dp = tl.load(dpre + rows[None, :] * K + cols[:, None], mask=col_mask[:, None] & row_mask[None, :], other=0.0)
        x = tl.load(h3 + rows[:, None] * H + units[None, :], mask=row_mask[:, None] & unit_mask[None, :],
                    other=0.0).to(ACC)
        acc = tl.dot(dp, x, acc, input_precision="ieee", out_dtype=ACC)
        bias += tl.sum(dp, axis=1)
    params = dhead + t.to(tl.int64) * P
    tl.store(params + cols[:, None] * H + units[None, :], acc, mask=col_mask[:, None] & unit_mask[None, :])
    tl.store(params + B_OUT + cols, bias, mask=col_mask)
    if tl.program_id(1) == 0:
        total = tl.zeros([BR], dtype=ACC)
        for r in range(r0, r1, BR):
            rows = r + local
            total += tl.load(row_sums + rows, mask=rows < r1, other=0.0)
        tl.store(params + SCALE, tl.sum(total, axis=0))


# -------------------------------------------------------------------------------------------- launchers
def _constants(K: int, H: int, dtype: torch.dtype) -> dict:
    dims = GroupDims(K=K, Ar=0, Ds=0, H=H)
    _, b_out, scale = dims.head_offsets()
    return dict(K=K, H=H, HP=next_pow2(H, 16), P=dims.head_size, B_OUT=b_out, SCALE=scale,
                ACC=TL_DTYPES[compute_dtype(dtype)])


def _step_size(lr: float, like: torch.Tensor) -> torch.Tensor:
    """``lr`` as a one-element tensor in the compute dtype: a Python float would reach the kernel
    as float32, which float64 results cannot afford."""
    return cached_table("step_size", (float(lr),), lambda: [float(lr)], like, compute_dtype(like.dtype))


def launch_forward(h3, head, w, g, rows: Sequence[int], lr: float, w_new, delta,
                   blocks: Optional[Blocks] = None) -> None:
    """Write ``w_new`` and ``δ`` (both ``[R, K]``, in full)."""
    h3, head, w, g = (t.contiguous() for t in (h3, head, w, g))
    bs = blocks or default_blocks(w.device)
    K, H = w.shape[1], h3.shape[1]
    table = row_blocks(rows, bs.rows, w)
    wrap_triton(_forward_kernel)[(table.shape[0], triton.cdiv(K, bs.k))](
        h3, head, w, g, table, w_new, delta, _step_size(lr, w), BR=bs.rows, BK=bs.k, **_constants(K, H, w.dtype))


def launch_backward(dw_new: Optional[torch.Tensor], ddelta: Optional[torch.Tensor], h3, head, g,
                    rows: Sequence[int], lr: float, dh3, dhead, dpre, row_sums,
                    blocks: Optional[Blocks] = None) -> None:
    """Write ``dh3 [R, H]`` and ``dhead [G, P_head]`` from the gradients of ``(w_new, δ)``
    (``None`` = zero), through the scratch ``dpre [R, K]`` and ``row_sums [R]`` (compute dtype;
    all written in full)."""
    h3, head, g = (t.contiguous() for t in (h3, head, g))
    bs = blocks or default_blocks(g.device)
    K, H = g.shape[1], h3.shape[1]
    consts = _constants(K, H, g.dtype)
    table = row_blocks(rows, bs.rows, g)
    wrap_triton(_backward_rows_kernel)[(table.shape[0],)](
        h3, head, g, table, g if dw_new is None else dw_new.contiguous(),
        g if ddelta is None else ddelta.contiguous(), dpre, dh3, row_sums, _step_size(lr, g),
        HAS_DW=dw_new is not None, HAS_DDELTA=ddelta is not None, BR=bs.rows, BK=bs.k, **consts)
    wrap_triton(_backward_weights_kernel)[(head.shape[0], triton.cdiv(K, bs.k))](
        h3, dpre, row_sums, row_offsets(rows, g), dhead, BR=bs.rows, BK=bs.k, **consts)


# ------------------------------------------------------------------------------------- torch.library
def _gated_update_fake(h3, head, w, g, rows, lr):
    return w.new_empty(w.shape), w.new_empty(w.shape)


@define_op("fastl2r_triton::gated_update", _gated_update_fake)
def gated_update(h3: torch.Tensor, head: torch.Tensor, w: torch.Tensor, g: torch.Tensor, rows: list[int],
                 lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_new, δ)`` as the reference's ``gated_update``."""
    w_new, delta = new_output(w.shape, w), new_output(w.shape, w)
    launch_forward(h3, head, w, g, rows, lr, w_new, delta)
    return w_new, delta


def _gated_update_backward_fake(dw_new, ddelta, h3, head, g, rows, lr):
    return h3.new_empty(h3.shape), head.new_empty(head.shape)


@define_op("fastl2r_triton::gated_update_backward", _gated_update_backward_fake)
def gated_update_backward(dw_new: Optional[torch.Tensor], ddelta: Optional[torch.Tensor], h3: torch.Tensor,
                          head: torch.Tensor, g: torch.Tensor, rows: list[int], lr: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dh3, dhead)`` from the gradients of ``gated_update``'s ``(w_new, δ)``; None where that output is
    unused (δ, by most losses), which the kernels read as zero."""
    dh3, dhead = new_output(h3.shape, h3), new_output(head.shape, head)
    scratch = compute_dtype(g.dtype)
    launch_backward(dw_new, ddelta, h3, head, g, rows, lr, dh3, dhead, new_output(g.shape, g, scratch),
                    new_output(g.shape[:1], g, scratch))
    return dh3, dhead


def _setup_context(ctx, inputs, output):
    h3, head, w, g, rows, lr = inputs
    ctx.rows, ctx.lr = rows, lr
    ctx.set_materialize_grads(False)  # an unused output's cotangent stays None
    ctx.save_for_backward(h3, head, g)


def _backward(ctx, dw_new, ddelta):
    h3, head, g = ctx.saved_tensors
    dh3, dhead = gated_update_backward(dw_new, ddelta, h3, head, g, ctx.rows, ctx.lr)
    return dh3, dhead, dw_new, None, None, None


gated_update.register_autograd(_backward, setup_context=_setup_context)
