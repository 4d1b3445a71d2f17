"""The grouped meta-LSTM step (DESIGN §1.3, §3.2): every row of every meta-net of a group.

The rows come in segments, one per (tensor, episode slot) (``row_offsets``): each segment
is normalised on its own and has its own shared input; its rows use its tensor's meta-net.

Forward, two launches per group whatever the number of tensors and slots in it:

1. ``_prologue_kernel``, grid ``(G·S,)``: per segment, the RMS of each feature block
   (``w``, ``g``, each per-row activation column, the shared activations), stored as
   inverse scales, and cell 1's effective bias ``b1 + W_ih1[:, shared] · a_shared/rms``:
   the shared ``a_in`` term is computed once per segment, never per row.
2. ``_forward_kernel``, grid ``(row blocks,)``: a block is at most ``Blocks.rows`` rows of
   one segment (``row_blocks``), so a program reads one meta-net's weights.  It builds
   the normalised features on the fly (no ``[R, D]`` feature matrix is ever written),
   multiplies them into the four gate accumulators in ``[BK, H]`` weight tiles, then
   runs the three cells with the gates, cell update and ReLU fused.  Every cell input
   (features, ReLU(h) of the cell below, the cell's own h) is consumed ``BK`` columns at
   a time, read from memory: the block's new h, just written by the program's own
   threads, is read back (after a barrier; from L1/L2) rather than kept whole in
   registers, so no ``[H, H]`` weight tile is ever live (``tools/compile_check.py``: no spills).

Backward, two launches.  The forward saves the four gate activations of every cell
(``gates [3, R, 4H]``, 12·H floats per row) instead of recomputing them: recomputing
would repeat the forward's ``[R, D] × [D, 4H]`` product, the largest read of the op,
while storing costs a write of about twice the size of the new state.  The cell
state ``c_new`` is recomputed from the gates and ``c`` (three flops, no read).

3. ``_backward_rows_kernel``, grid ``(row blocks,)``: cells 3 → 1 for a block of rows:
   the gradient of each cell's pre-activation gates (written to ``dgates [3, R, 4H]``),
   of the incoming ``h`` and ``c`` and, through the features, of ``w``; every input
   gradient is produced ``BK`` columns at a time, and the one passed down to the cell
   below goes through memory (``dh`` of that cell, after a barrier) like the forward's h.
4. ``_backward_weights_kernel``, grid ``(G, 4H / Blocks.gates, column tiles)``: every
   parameter gradient as ``dgates_kᵀ · X`` summed over the tensor's rows of every slot,
   where X is the features (cell 1, scaled segment by segment), ReLU(h) of the cell below,
   the incoming h, or ones (bias), per a cached tile table built from
   ``fastl2r.ops.layout``; no atomics, so it is deterministic.

All arithmetic is in the compute dtype (float64 for float64 tensors, else float32;
``tl.dot`` with ``input_precision="ieee"``: no TF32), and so are the saved gates and scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastl2r.ops.layout import NUM_CELLS, RMS_EPS, GroupDims, slot_count

from . import (TL_DTYPES, block_segment, cached_table, compute_dtype, define_op, new_output, next_pow2, row_block,
               row_blocks, row_offsets, sigmoid, tanh, wrap_triton)

REDUCE_BLOCK = 1024  # elements per step of the prologue's sums of squares


@dataclass(frozen=True)
class Blocks:
    """Block sizes; any choice computes the same function (every edge is masked).

    The GPU's are chosen by register use on sm_90 (``python tools/compile_check.py``):
    with ``k = 16`` no kernel spills for any resnet32_gn group (``k = 32`` spills up to 1.6 KB
    per thread where K < 32 or H = 32), at 4 warps.
    """

    rows: int = 16      # rows per program of the row kernels (tl.dot needs >= 16)
    k: int = 16         # input columns per step of every cell-input product, of dh and of dw
    gates: int = 64     # gate rows per program of the weight-gradient kernel
    columns: int = 32   # parameter columns per program of the weight-gradient kernel


GPU_BLOCKS = Blocks()
# The interpreter runs programs one after another, each op costing Python time: fewer, larger ones.
INTERPRETER_BLOCKS = Blocks(rows=64, k=128, gates=256, columns=128)


def default_blocks(device: torch.device) -> Blocks:
    """The block sizes for tensors on ``device``: the interpreter's on a CPU, the GPU's elsewhere."""
    return INTERPRETER_BLOCKS if device.type == "cpu" else GPU_BLOCKS

# Kinds of column tile of the weight-gradient kernel: what X is.
FEATURES, STATE, RELU_OUTPUT, ONES = (tl.constexpr(kind) for kind in range(4))


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot_tile(a, tile, mask, acc):
    """``acc + a · W`` in ``a``'s dtype, IEEE (no TF32), for the weight tile W at ``tile`` (zero outside
    ``mask``; no ``acc``: zero): every product of a gate's weights in these kernels."""
    return tl.dot(a, tl.load(tile, mask=mask, other=0.0).to(a.dtype), acc, input_precision="ieee", out_dtype=a.dtype)


@triton.jit
def _accumulate_inputs(acc_i, acc_f, acc_g, acc_o, source, source_stride, scale, weights, weight_stride,
                       gate_stride, n_in, rows, row_mask, units, unit_mask, RELU: tl.constexpr, BK: tl.constexpr):
    """``acc_q += X · W_qᵀ`` for the gates i, f, g, o over ``n_in`` input columns, ``BK`` at a time:
    ``X = scale · source[rows, :n_in]`` (row stride ``source_stride``; ReLU'd if ``RELU``) and ``W_q``
    the ``[unit, input]`` weights at ``weights`` (row stride ``weight_stride``; each next gate's
    ``gate_stride`` further).  Only ``[BK, H]`` weight tiles are ever held in registers."""
    k_local = tl.arange(0, BK)
    for k0 in range(0, n_in, BK):
        cols = k0 + k_local
        col_mask = cols < n_in
        x = tl.load(source + rows[:, None] * source_stride + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(acc_i.dtype) * scale
        if RELU:
            x = tl.maximum(x, 0.0)
        tile = weights + units[None, :] * weight_stride + cols[:, None]
        mask = col_mask[:, None] & unit_mask[None, :]
        acc_i = _dot_tile(x, tile, mask, acc_i)
        acc_f = _dot_tile(x, tile + gate_stride, mask, acc_f)
        acc_g = _dot_tile(x, tile + 2 * gate_stride, mask, acc_g)
        acc_o = _dot_tile(x, tile + 3 * gate_stride, mask, acc_o)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _finish_cell(acc_i, acc_f, acc_g, acc_o, bias, c, h_out, c_out, gates, rows, row_mask, units, unit_mask,
                 H: tl.constexpr):
    """Gate nonlinearities, cell update, stores of (h, c, gates)."""
    i = sigmoid(acc_i + tl.load(bias + units, mask=unit_mask, other=0.0).to(acc_i.dtype)[None, :])
    f = sigmoid(acc_f + tl.load(bias + H + units, mask=unit_mask, other=0.0).to(acc_i.dtype)[None, :])
    gg = tanh(acc_g + tl.load(bias + 2 * H + units, mask=unit_mask, other=0.0).to(acc_i.dtype)[None, :])
    o = sigmoid(acc_o + tl.load(bias + 3 * H + units, mask=unit_mask, other=0.0).to(acc_i.dtype)[None, :])
    state = rows[:, None] * H + units[None, :]
    mask = row_mask[:, None] & unit_mask[None, :]
    c_new = f * tl.load(c + state, mask=mask, other=0.0).to(acc_i.dtype) + i * gg
    h_new = o * tanh(c_new)
    tl.store(h_out + state, h_new, mask=mask)
    tl.store(c_out + state, c_new, mask=mask)
    gate = gates + rows[:, None] * (4 * H) + units[None, :]
    tl.store(gate, i, mask=mask)
    tl.store(gate + H, f, mask=mask)
    tl.store(gate + 2 * H, gg, mask=mask)
    tl.store(gate + 3 * H, o, mask=mask)


@triton.jit
def _prologue_kernel(w, g, a_row, a_shared, lstm, offsets, scales, bias1, slots,
                     K: tl.constexpr, AR: tl.constexpr, DS: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                     P: tl.constexpr, NS: tl.constexpr, B1: tl.constexpr, EPS: tl.constexpr,
                     AR_P: tl.constexpr, DS_P: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
                     BR: tl.constexpr, GATE_BLOCK: tl.constexpr):
    e = tl.program_id(0)  # the segment: slot e % slots of tensor e // slots
    r0 = tl.load(offsets + e)
    r1 = tl.load(offsets + e + 1)
    n = (r1 - r0) * K
    idx = tl.arange(0, BLOCK)
    sum_w = tl.zeros([BLOCK], dtype=ACC)
    sum_g = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, n, BLOCK):
        i = i0 + idx
        m = i < n
        xw = tl.load(w + r0 * K + i, mask=m, other=0.0).to(ACC)
        xg = tl.load(g + r0 * K + i, mask=m, other=0.0).to(ACC)
        sum_w += xw * xw
        sum_g += xg * xg
    count = n.to(ACC)
    scale = scales + e * NS
    tl.store(scale, 1.0 / (tl.sqrt(tl.sum(sum_w, axis=0) / count) + EPS))
    tl.store(scale + 1, 1.0 / (tl.sqrt(tl.sum(sum_g, axis=0) / count) + EPS))

    cols = tl.arange(0, AR_P)
    col_mask = cols < AR
    local = tl.arange(0, BR)
    sum_a = tl.zeros([BR, AR_P], dtype=ACC)
    for r in range(r0, r1, BR):
        rows = r + local
        m = (rows < r1)[:, None] & col_mask[None, :]
        xa = tl.load(a_row + rows[:, None] * AR + cols[None, :], mask=m, other=0.0).to(ACC)
        sum_a += xa * xa
    rms_a = tl.sqrt(tl.sum(sum_a, axis=0) / (r1 - r0).to(ACC))
    tl.store(scale + 2 + cols, 1.0 / (rms_a + EPS), mask=col_mask)

    params = lstm + (e // slots).to(tl.int64) * P
    gate_rows = tl.arange(0, GATE_BLOCK)
    if DS > 0:
        ds = tl.arange(0, DS_P)
        ds_mask = ds < DS
        shared = tl.load(a_shared + e * DS + ds, mask=ds_mask, other=0.0).to(ACC)
        inv_s = 1.0 / (tl.sqrt(tl.sum(shared * shared, axis=0) / DS) + EPS)
        tl.store(scale + 2 + AR, inv_s)
        shared = shared * inv_s
        for q0 in tl.static_range(0, 4 * H, GATE_BLOCK):
            q = q0 + gate_rows
            qm = q < 4 * H
            w_shared = tl.load(params + q[:, None] * D + (D - DS) + ds[None, :],
                               mask=qm[:, None] & ds_mask[None, :], other=0.0).to(ACC)
            b = tl.load(params + B1 + q, mask=qm, other=0.0).to(ACC)
            tl.store(bias1 + e * (4 * H) + q, b + tl.sum(w_shared * shared[None, :], axis=1), mask=qm)
    else:
        tl.store(scale + 2 + AR, 0.0)
        for q0 in tl.static_range(0, 4 * H, GATE_BLOCK):
            q = q0 + gate_rows
            qm = q < 4 * H
            tl.store(bias1 + e * (4 * H) + q, tl.load(params + B1 + q, mask=qm, other=0.0), mask=qm)


@triton.jit
def _forward_kernel(w, g, a_row, lstm, bias1, scales, blocks, h, c, h_out, c_out, gates, R,
                    K: tl.constexpr, AR: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr,
                    P: tl.constexpr, NS: tl.constexpr, HH1: tl.constexpr, IH2: tl.constexpr,
                    HH2: tl.constexpr, B2: tl.constexpr, IH3: tl.constexpr, HH3: tl.constexpr,
                    B3: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    t, rows, row_mask, units, unit_mask = row_block(blocks, H, HP, BR)
    segment = block_segment(blocks)
    params = lstm + t.to(tl.int64) * P
    scale = scales + segment * NS
    inv_w = tl.load(scale)
    inv_g = tl.load(scale + 1)

    # Cell 1: features [w, g, a_row] · W_ih1ᵀ (the shared block is in bias1), then h · W_hh1ᵀ.
    acc_i = tl.zeros([BR, HP], dtype=ACC)
    acc_f = tl.zeros([BR, HP], dtype=ACC)
    acc_g = tl.zeros([BR, HP], dtype=ACC)
    acc_o = tl.zeros([BR, HP], dtype=ACC)
    acc_i, acc_f, acc_g, acc_o = _accumulate_inputs(acc_i, acc_f, acc_g, acc_o, w, K, inv_w, params, D, H * D, K,
                                                    rows, row_mask, units, unit_mask, False, BK)
    acc_i, acc_f, acc_g, acc_o = _accumulate_inputs(acc_i, acc_f, acc_g, acc_o, g, K, inv_g, params + K, D, H * D,
                                                    K, rows, row_mask, units, unit_mask, False, BK)
    for j in tl.static_range(AR):
        xa = tl.load(a_row + rows * AR + j, mask=row_mask, other=0.0).to(ACC) * tl.load(scale + 2 + j)
        column = params + 2 * K + j + units * D
        acc_i += xa[:, None] * tl.load(column, mask=unit_mask, other=0.0).to(ACC)[None, :]
        acc_f += xa[:, None] * tl.load(column + H * D, mask=unit_mask, other=0.0).to(ACC)[None, :]
        acc_g += xa[:, None] * tl.load(column + 2 * H * D, mask=unit_mask, other=0.0).to(ACC)[None, :]
        acc_o += xa[:, None] * tl.load(column + 3 * H * D, mask=unit_mask, other=0.0).to(ACC)[None, :]
    acc_i, acc_f, acc_g, acc_o = _accumulate_inputs(acc_i, acc_f, acc_g, acc_o, h, H, 1.0, params + HH1, H, H * H,
                                                    H, rows, row_mask, units, unit_mask, False, BK)
    _finish_cell(acc_i, acc_f, acc_g, acc_o, bias1 + segment * (4 * H), c, h_out, c_out, gates, rows, row_mask,
                 units, unit_mask, H)

    # Cells 2 and 3: ReLU(h_new) of the cell below, read back from h_out where this program's
    # threads have just written it (hence the barrier), then the cell's own h.
    for cell in tl.static_range(1, 3):
        if cell == 1:
            ih, hh, b = IH2, HH2, B2
        else:
            ih, hh, b = IH3, HH3, B3
        tl.debug_barrier()
        acc_i = tl.zeros([BR, HP], dtype=ACC)
        acc_f = tl.zeros([BR, HP], dtype=ACC)
        acc_g = tl.zeros([BR, HP], dtype=ACC)
        acc_o = tl.zeros([BR, HP], dtype=ACC)
        acc_i, acc_f, acc_g, acc_o = _accumulate_inputs(acc_i, acc_f, acc_g, acc_o, h_out + (cell - 1) * R * H, H,
                                                        1.0, params + ih, H, H * H, H, rows, row_mask, units,
                                                        unit_mask, True, BK)
        acc_i, acc_f, acc_g, acc_o = _accumulate_inputs(acc_i, acc_f, acc_g, acc_o, h + cell * R * H, H, 1.0,
                                                        params + hh, H, H * H, H, rows, row_mask, units, unit_mask,
                                                        False, BK)
        _finish_cell(acc_i, acc_f, acc_g, acc_o, params + b, c + cell * R * H, h_out + cell * R * H,
                     c_out + cell * R * H, gates + cell * R * 4 * H, rows, row_mask, units, unit_mask, H)


@triton.jit
def _store_input_grad(d_i, d_f, d_g, d_o, weights, weight_stride, gate_stride, n_in, out, out_stride, scale,
                      relu_input, rows, row_mask, units, unit_mask, RELU: tl.constexpr, BK: tl.constexpr):
    """Store ``scale · Σ_q d_q · W_q``, the gradient of a cell input from the gradients of its
    pre-activation gates, to ``out[rows, :n_in]`` (row stride ``out_stride``), ``BK`` columns at a
    time; ``W_q`` is the ``[unit, input]`` weights at ``weights`` (row stride ``weight_stride``; each
    next gate's ``gate_stride`` further).  With ``RELU`` the input was ReLU(``relu_input``): zero where
    that is not positive.  Only ``[H, BK]`` weight tiles are ever held in registers."""
    k_local = tl.arange(0, BK)
    for k0 in range(0, n_in, BK):
        cols = k0 + k_local
        col_mask = cols < n_in
        tile = weights + units[:, None] * weight_stride + cols[None, :]
        mask = unit_mask[:, None] & col_mask[None, :]
        acc = _dot_tile(d_i, tile, mask, None)
        acc = _dot_tile(d_f, tile + gate_stride, mask, acc)
        acc = _dot_tile(d_g, tile + 2 * gate_stride, mask, acc)
        acc = _dot_tile(d_o, tile + 3 * gate_stride, mask, acc)
        offsets = rows[:, None] * out_stride + cols[None, :]
        out_mask = row_mask[:, None] & col_mask[None, :]
        if RELU:
            acc = tl.where(tl.load(relu_input + offsets, mask=out_mask, other=0.0) > 0, acc, 0.0)
        tl.store(out + offsets, acc * scale, mask=out_mask)


@triton.jit
def _cell_backward(dh, dh_out, dc_out, c, gates, dgates, dc_in, state, mask, rows, units,
                   H: tl.constexpr, HAS_DH: tl.constexpr, HAS_DC: tl.constexpr):
    """One cell's backward for a row block, to the gradients of its gates; ``dh`` is what reaches
    its h_new from the cell above.  Stores the gradients of its gates and incoming c; returns the
    gate gradients."""
    if HAS_DH:
        dh += tl.load(dh_out + state, mask=mask, other=0.0).to(dh.dtype)
    gate = gates + rows[:, None] * (4 * H) + units[None, :]
    i = tl.load(gate, mask=mask, other=0.0)
    f = tl.load(gate + H, mask=mask, other=0.0)
    gg = tl.load(gate + 2 * H, mask=mask, other=0.0)
    o = tl.load(gate + 3 * H, mask=mask, other=0.0)
    c_prev = tl.load(c + state, mask=mask, other=0.0).to(dh.dtype)
    tanh_c = tanh(f * c_prev + i * gg)
    dc = dh * o * (1.0 - tanh_c * tanh_c)
    if HAS_DC:
        dc += tl.load(dc_out + state, mask=mask, other=0.0).to(dh.dtype)
    d_i = dc * gg * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - gg * gg)
    d_o = dh * tanh_c * o * (1.0 - o)
    tl.store(dc_in + state, dc * f, mask=mask)
    dgate = dgates + rows[:, None] * (4 * H) + units[None, :]
    tl.store(dgate, d_i, mask=mask)
    tl.store(dgate + H, d_f, mask=mask)
    tl.store(dgate + 2 * H, d_g, mask=mask)
    tl.store(dgate + 3 * H, d_o, mask=mask)
    return d_i, d_f, d_g, d_o


@triton.jit
def _backward_rows_kernel(dh_out, dc_out, lstm, scales, blocks, c, h_out, gates, dgates, dh_in, dc_in, dw, R,
                          K: tl.constexpr, H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr,
                          P: tl.constexpr, NS: tl.constexpr, HH1: tl.constexpr, IH2: tl.constexpr,
                          HH2: tl.constexpr, IH3: tl.constexpr, HH3: tl.constexpr,
                          HAS_DH: tl.constexpr, HAS_DC: tl.constexpr, ACC: tl.constexpr, BR: tl.constexpr,
                          BK: tl.constexpr):
    t, rows, row_mask, units, unit_mask = row_block(blocks, H, HP, BR)
    params = lstm + t.to(tl.int64) * P
    state = rows[:, None] * H + units[None, :]
    state_mask = row_mask[:, None] & unit_mask[None, :]

    # Cells 3 -> 1, a runtime loop (one cell's code, not three).  The gradient that reaches a
    # cell's h_new from the cell above travels through dh_in of that cell (whose final value, the
    # gradient of the incoming h, is written after it is read), written and read back by this
    # program's threads: hence the barriers.
    for step in range(3):
        cell = 2 - step
        from_above = (tl.zeros([BR, HP], dtype=tl.int32) + cell) < 2  # nothing above the top cell
        dh = tl.load(dh_in + cell * R * H + state, mask=state_mask & from_above, other=0.0).to(ACC)
        tl.debug_barrier()
        d_i, d_f, d_g, d_o = _cell_backward(dh, dh_out + cell * R * H, dc_out + cell * R * H, c + cell * R * H,
                                            gates + cell * R * 4 * H, dgates + cell * R * 4 * H,
                                            dc_in + cell * R * H, state, state_mask, rows, units, H, HAS_DH,
                                            HAS_DC)
        hh = tl.where(cell == 0, HH1, HH2 + (cell - 1) * (HH3 - HH2))
        _store_input_grad(d_i, d_f, d_g, d_o, params + hh, H, H * H, H, dh_in + cell * R * H, H, 1.0, dh_in, rows,
                          row_mask, units, unit_mask, False, BK)
        if cell > 0:
            _store_input_grad(d_i, d_f, d_g, d_o, params + IH2 + (cell - 1) * (IH3 - IH2), H, H * H, H,
                              dh_in + (cell - 1) * R * H, H, 1.0, h_out + (cell - 1) * R * H, rows, row_mask, units,
                              unit_mask, True, BK)
            tl.debug_barrier()
        else:
            # Through the features to w (W_ih1's first K columns; the RMS scale is a constant).
            inv_w = tl.load(scales + block_segment(blocks) * NS)
            if K < BK:  # a few columns (GroupNorm: one): one reduction each, no mostly-masked tile
                for k in tl.static_range(K):
                    column = params + units * D + k
                    dw_k = (d_i * tl.load(column, mask=unit_mask, other=0.0).to(ACC)[None, :]
                            + d_f * tl.load(column + H * D, mask=unit_mask, other=0.0).to(ACC)[None, :]
                            + d_g * tl.load(column + 2 * H * D, mask=unit_mask, other=0.0).to(ACC)[None, :]
                            + d_o * tl.load(column + 3 * H * D, mask=unit_mask, other=0.0).to(ACC)[None, :])
                    tl.store(dw + rows * K + k, tl.sum(dw_k, axis=1) * inv_w, mask=row_mask)
            else:
                _store_input_grad(d_i, d_f, d_g, d_o, params, D, H * D, K, dw, K, inv_w, dw, rows, row_mask, units,
                                  unit_mask, False, BK)


@triton.jit
def _backward_weights_kernel(dgates, w, g, a_row, a_shared, h, h_out, scales, offsets, tiles, dlstm, R, slots,
                             K: tl.constexpr, AR: tl.constexpr, DS: tl.constexpr, H: tl.constexpr,
                             D: tl.constexpr, P: tl.constexpr, NS: tl.constexpr, ACC: tl.constexpr,
                             BG: tl.constexpr, BC: tl.constexpr, BR: tl.constexpr):
    t = tl.program_id(0)
    q = tl.program_id(1) * BG + tl.arange(0, BG)
    tile = tiles + 5 * tl.program_id(2)
    kind = tl.load(tile)
    cell = tl.load(tile + 1)
    cols = tl.load(tile + 2) + tl.arange(0, BC)
    n_cols = tl.load(tile + 3)
    out = dlstm + t.to(tl.int64) * P + tl.load(tile + 4)
    r0 = tl.load(offsets + t * slots)  # the tensor's rows, all its slots
    r1 = tl.load(offsets + (t + 1) * slots)
    q_mask = q < 4 * H
    col_mask = cols < n_cols
    local = tl.arange(0, BR)
    grad = dgates + cell * R * 4 * H
    acc = tl.zeros([BG, BC], dtype=ACC)
    if kind == FEATURES:
        is_w = cols < K
        is_g = (cols >= K) & (cols < 2 * K)
        is_a = (cols >= 2 * K) & (cols < D - DS)
        is_s = (cols >= D - DS) & col_mask
        # Segment by segment: each has its own scales and shared input.
        for segment in range(t * slots, (t + 1) * slots):
            scale = scales + segment * NS
            inv = tl.where(is_w, tl.load(scale), tl.load(scale + 1))
            inv = tl.where(is_a, tl.load(scale + 2 + cols - 2 * K, mask=is_a, other=0.0), inv)
            inv = tl.where(is_s, tl.load(scale + 2 + AR), inv)
            shared = tl.load(a_shared + segment * DS + cols - (D - DS), mask=is_s, other=0.0).to(ACC)
            s1 = tl.load(offsets + segment + 1)
            for r in range(tl.load(offsets + segment), s1, BR):
                rows = r + local
                row_mask = rows < s1
                dgt = tl.load(grad + rows[None, :] * (4 * H) + q[:, None],
                              mask=q_mask[:, None] & row_mask[None, :], other=0.0)
                rm = row_mask[:, None]
                x = tl.load(w + rows[:, None] * K + cols[None, :], mask=rm & is_w[None, :], other=0.0).to(ACC)
                x += tl.load(g + rows[:, None] * K + cols[None, :] - K, mask=rm & is_g[None, :],
                             other=0.0).to(ACC)
                x += tl.load(a_row + rows[:, None] * AR + cols[None, :] - 2 * K, mask=rm & is_a[None, :],
                             other=0.0).to(ACC)
                x += tl.where(rm, shared[None, :], 0.0)
                acc = tl.dot(dgt, x * inv[None, :], acc, input_precision="ieee", out_dtype=ACC)
    elif kind == ONES:
        for r in range(r0, r1, BR):
            rows = r + local
            dgt = tl.load(grad + rows[None, :] * (4 * H) + q[:, None], mask=q_mask[:, None] & (rows < r1)[None, :],
                          other=0.0)
            acc += tl.where(cols[None, :] == 0, tl.sum(dgt, axis=1)[:, None], 0.0)
    else:
        source = h_out + (cell - 1) * R * H
        if kind == STATE:
            source = h + cell * R * H
        for r in range(r0, r1, BR):
            rows = r + local
            row_mask = rows < r1
            dgt = tl.load(grad + rows[None, :] * (4 * H) + q[:, None], mask=q_mask[:, None] & row_mask[None, :],
                          other=0.0)
            x = tl.load(source + rows[:, None] * H + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0).to(ACC)
            if kind == RELU_OUTPUT:
                x = tl.maximum(x, 0.0)
            acc = tl.dot(dgt, x, acc, input_precision="ieee", out_dtype=ACC)
    tl.store(out + q[:, None] * n_cols + cols[None, :], acc, mask=q_mask[:, None] & col_mask[None, :])


# -------------------------------------------------------------------------------------------- launchers
def _weight_tiles(dims: GroupDims, columns: int, like: torch.Tensor) -> torch.Tensor:
    """``int32 [n, 5]``: (kind, cell, first column, columns, offset) of every column tile of the
    lstm gradient: each parameter matrix of the layout, cut into tiles of ``columns``."""
    def build():
        tiles = []
        for cell, (ih, hh, b) in enumerate(dims.lstm_offsets()):
            n_in, kind_in = (dims.D, FEATURES) if cell == 0 else (dims.H, RELU_OUTPUT)
            tiles += [[kind_in.value, cell, c0, n_in, ih] for c0 in range(0, n_in, columns)]
            tiles += [[STATE.value, cell, c0, dims.H, hh] for c0 in range(0, dims.H, columns)]
            tiles.append([ONES.value, cell, 0, 1, b])
        return tiles
    return cached_table("meta_lstm_weight_tiles", (dims, columns), build, like)


def scale_count(dims: GroupDims) -> int:
    """Inverse RMS scales per segment: w, g, each per-row activation column, the shared block."""
    return 3 + dims.Ar


def _constants(dims: GroupDims, dtype: torch.dtype) -> dict:
    (ih1, hh1, _), (ih2, hh2, _), (ih3, hh3, _) = dims.lstm_offsets()
    assert ih1 == 0, "the kernels read W_ih1 at the start of a tensor's lstm row"
    return dict(K=dims.K, H=dims.H, HP=next_pow2(dims.H, 16), D=dims.D, P=dims.lstm_size,
                NS=scale_count(dims), HH1=hh1, IH2=ih2, HH2=hh2, IH3=ih3, HH3=hh3,
                ACC=TL_DTYPES[compute_dtype(dtype)])


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


def _present(t: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``t``, or a valid stand-in pointer where ``t`` is empty and never read."""
    return t if t.numel() else fallback


def launch_forward(w, g, a_row, a_shared, lstm, rows: Sequence[int], h, c,
                   h_out, c_out, gates, scales, bias1, blocks: Optional[Blocks] = None) -> None:
    """Run the forward into ``h_out, c_out [3, R, H]``, ``gates [3, R, 4H]``, ``scales [G·S, 3 + Ar]``,
    and the scratch ``bias1 [G·S, 4H]`` (the last three in the compute dtype; all written in full)."""
    w, g, a_row, a_shared, lstm, h, c = _contiguous(w, g, a_row, a_shared, lstm, h, c)
    dims = GroupDims.of(w, a_row, a_shared, h)
    bs = blocks or default_blocks(w.device)
    consts = _constants(dims, w.dtype)
    R, slots = w.shape[0], slot_count(rows, w.shape[0])
    table = row_blocks(rows, bs.rows, w, slots)
    wrap_triton(_prologue_kernel)[(len(rows) * slots,)](
        w, g, _present(a_row, scales), _present(a_shared, scales), lstm, row_offsets(rows, w, slots), scales,
        bias1, slots, K=dims.K, AR=dims.Ar, DS=dims.Ds, H=dims.H, D=dims.D, P=dims.lstm_size, NS=consts["NS"],
        B1=dims.lstm_offsets()[0][2], EPS=RMS_EPS, AR_P=next_pow2(dims.Ar), DS_P=next_pow2(dims.Ds),
        ACC=consts["ACC"], BLOCK=REDUCE_BLOCK, BR=bs.rows, GATE_BLOCK=bs.gates)
    wrap_triton(_forward_kernel)[(table.shape[0],)](
        w, g, _present(a_row, scales), lstm, bias1, scales, table, h, c, h_out, c_out, gates, R, AR=dims.Ar,
        B2=dims.lstm_offsets()[1][2], B3=dims.lstm_offsets()[2][2], BR=bs.rows, BK=bs.k, **consts)


def launch_backward(dh_out: Optional[torch.Tensor], dc_out: Optional[torch.Tensor], w, g, a_row, a_shared,
                    lstm, rows: Sequence[int], h, c, h_out, gates, scales,
                    dw, dlstm, dh, dc, dgates, blocks: Optional[Blocks] = None) -> None:
    """Gradients ``dw [R, K]``, ``dlstm [G, P]``, ``dh, dc [3, R, H]`` from those of the outputs
    (``None`` = zero), through the scratch ``dgates [3, R, 4H]`` (compute dtype; all written in full)."""
    w, g, a_row, a_shared, lstm, h, c, h_out, gates, scales = _contiguous(
        w, g, a_row, a_shared, lstm, h, c, h_out, gates, scales)
    dims = GroupDims.of(w, a_row, a_shared, h)
    bs = blocks or default_blocks(w.device)
    consts = _constants(dims, w.dtype)
    G, R, slots = lstm.shape[0], w.shape[0], slot_count(rows, w.shape[0])
    table = row_blocks(rows, bs.rows, w, slots)
    wrap_triton(_backward_rows_kernel)[(table.shape[0],)](
        h if dh_out is None else dh_out.contiguous(), c if dc_out is None else dc_out.contiguous(),
        lstm, scales, table, c, h_out, gates, dgates, dh, dc, dw, R,
        HAS_DH=dh_out is not None, HAS_DC=dc_out is not None, BR=bs.rows, BK=bs.k, **consts)
    tiles = _weight_tiles(dims, bs.columns, w)
    wrap_triton(_backward_weights_kernel)[(G, triton.cdiv(4 * dims.H, bs.gates), tiles.shape[0])](
        dgates, w, g, _present(a_row, scales), _present(a_shared, scales), h, h_out, scales,
        row_offsets(rows, w, slots), tiles, dlstm, R, slots, K=dims.K, AR=dims.Ar, DS=dims.Ds, H=dims.H,
        D=dims.D, P=dims.lstm_size, NS=consts["NS"], ACC=consts["ACC"], BG=bs.gates, BC=bs.columns, BR=bs.rows)


# ------------------------------------------------------------------------------------- torch.library
def _meta_lstm_fake(w, g, a_row, a_shared, lstm, rows, h, c):
    dims = GroupDims.of(w, a_row, a_shared, h)
    R, acc = w.shape[0], compute_dtype(w.dtype)
    return (h.new_empty(h.shape), c.new_empty(c.shape), w.new_empty(NUM_CELLS, R, 4 * dims.H, dtype=acc),
            w.new_empty(a_shared.shape[0], scale_count(dims), dtype=acc))


@define_op("fastl2r_triton::meta_lstm", _meta_lstm_fake)
def meta_lstm(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor, lstm: torch.Tensor,
              rows: list[int], h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h_new, c_new, gates, scales)``: the reference's ``meta_lstm`` plus what its backward reads
    (``scales`` per segment: one row per (tensor, slot), as ``a_shared``)."""
    dims = GroupDims.of(w, a_row, a_shared, h)
    R, acc = w.shape[0], compute_dtype(w.dtype)
    h_out, c_out = new_output(h.shape, h), new_output(c.shape, c)
    gates = new_output((NUM_CELLS, R, 4 * dims.H), w, acc)
    scales = new_output((a_shared.shape[0], scale_count(dims)), w, acc)
    launch_forward(w, g, a_row, a_shared, lstm, rows, h, c, h_out, c_out, gates, scales,
                   new_output((a_shared.shape[0], 4 * dims.H), w, acc))
    return h_out, c_out, gates, scales


def _meta_lstm_backward_fake(dh_out, dc_out, w, g, a_row, a_shared, lstm, rows, h, c, h_out, gates, scales):
    return w.new_empty(w.shape), lstm.new_empty(lstm.shape), h.new_empty(h.shape), c.new_empty(c.shape)


@define_op("fastl2r_triton::meta_lstm_backward", _meta_lstm_backward_fake)
def meta_lstm_backward(dh_out: Optional[torch.Tensor], dc_out: Optional[torch.Tensor], w: torch.Tensor,
                       g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor, lstm: torch.Tensor,
                       rows: list[int], h: torch.Tensor, c: torch.Tensor, h_out: torch.Tensor,
                       gates: torch.Tensor, scales: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dw, dlstm, dh, dc)`` from the gradients of ``meta_lstm``'s ``(h_new, c_new)``; None where that
    output is unused (c' at the end of a T-BPTT window), which the kernels read as zero."""
    dw, dlstm, dh, dc = new_output(w.shape, w), new_output(lstm.shape, lstm), new_output(h.shape, h), new_output(
        c.shape, c)
    launch_backward(dh_out, dc_out, w, g, a_row, a_shared, lstm, rows, h, c, h_out, gates, scales,
                    dw, dlstm, dh, dc, new_output(gates.shape, gates))
    return dw, dlstm, dh, dc


def _setup_context(ctx, inputs, output):
    w, g, a_row, a_shared, lstm, rows, h, c = inputs
    h_out, _, gates, scales = output
    ctx.rows = rows
    ctx.mark_non_differentiable(gates, scales)
    ctx.set_materialize_grads(False)  # an unused output's cotangent stays None
    ctx.save_for_backward(w, g, a_row, a_shared, lstm, h, c, h_out, gates, scales)


def _backward(ctx, dh_out, dc_out, _dgates, _dscales):
    w, g, a_row, a_shared, lstm, h, c, h_out, gates, scales = ctx.saved_tensors
    dw, dlstm, dh, dc = meta_lstm_backward(dh_out, dc_out, w, g, a_row, a_shared, lstm, ctx.rows, h, c, h_out,
                                           gates, scales)
    return dw, None, None, None, dlstm, None, dh, dc


meta_lstm.register_autograd(_backward, setup_context=_setup_context)
