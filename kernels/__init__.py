"""Triton kernels of fastl2r's fused operations (DESIGN §3), one file per op.

Each file holds the op's kernels, their launchers (which write into outputs the
caller allocates, so tests can poison them) and its ``torch.library`` registration
in the ``fastl2r_triton`` namespace (``define_op``), with fake kernels and autograd.
Only ``fastl2r.ops`` imports this package (it imports Triton); this package imports
nothing from fastl2r but ``fastl2r.ops.layout``, the layout of the meta-nets'
parameters and the RMS epsilon, so that the kernels sit below the ops.

On a CPU, Triton runs in its interpreter: ``TRITON_INTERPRET=1`` must be in the
environment before this package is imported, because ``triton.jit`` chooses
between compiling and interpreting when each kernel is defined.  ``INTERPRETED``
records which it was.

Arithmetic runs in float64 for float64 tensors and in float32 for every other
dtype (``compute_dtype``), so each backend matches the reference at its dtype's
precision.  This file holds what the op files share: the op registration and the
kernel wrapping that let ``torch.compile`` see the launches, exact ``sigmoid``/``tanh``
(Triton 3.6 has no ``tl.tanh`` and its libdevice path differs between versions),
the tables that map row blocks to the tensors and episode slots of a group, output
allocation; the layout's offsets come from ``fastl2r.ops.layout`` (never restated here).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.jit import JITFunction

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for tensors stored as ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def define_op(name: str, fake: Callable) -> Callable:
    """Decorator: the function as the op ``name`` (mutating none of its inputs), with the fake kernel
    ``fake``.  Where the kernels are compiled it is a ``torch.library.triton_op``, whose body
    ``torch.compile`` traces, so Inductor sees every kernel launch (``wrap_triton``); in Triton's
    interpreter a ``torch.library.custom_op``, opaque to ``torch.compile``: interpreted kernels run
    on real tensors only."""
    def register(fn: Callable):
        define = torch.library.custom_op if INTERPRETED else torch.library.triton_op
        op = define(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return register


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, so that a trace of a ``define_op`` body records the launch,
    for a compiled kernel; anything else as it is: an interpreted kernel (torch before 2.13 refuses
    to wrap one, and it runs eagerly anyway) or a stand-in that counts or records launches."""
    return torch.library.wrap_triton(kernel) if isinstance(kernel, JITFunction) else kernel


def new_output(shape: Sequence[int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised output or scratch buffer on ``like``'s device.  With
    ``FASTL2R_POISON_OUTPUTS=1`` (tests; the C++ ops read it too) it is NaN-filled, so an
    element a kernel forgets to write fails the comparison with the reference."""
    out = torch.empty(tuple(shape), device=like.device, dtype=dtype or like.dtype)
    if os.environ.get("FASTL2R_POISON_OUTPUTS") == "1":
        out.fill_(float("nan"))
    return out


@triton.jit
def sigmoid(x):
    """The logistic function at ``x``'s precision (the gates i, f, o)."""
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    """tanh to the precision of ``x``'s dtype (float32 or float64): ``(1 - e^{-2|x|}) / (1 + e^{-2|x|})``,
    and its Taylor series below 0.1, where that quotient loses digits (relative error < 4e-15)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    t = (1.0 - e) / (1.0 + e)
    a2 = a * a
    series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0 + a2 * (
        62.0 / 2835.0 + a2 * (-1382.0 / 155925.0))))))
    t = tl.where(a < 0.1, series, t)
    return tl.where(x < 0, -t, t)


@triton.jit
def row_block(blocks, H: tl.constexpr, HP: tl.constexpr, BR: tl.constexpr):
    """This program's entry of a ``row_blocks`` table: the tensor ``t`` of the group it serves, its
    ``BR`` rows with their mask (the block ends at ``r1``), and the ``HP`` hidden units padded from
    ``H`` with theirs."""
    pid = tl.program_id(0)
    t = tl.load(blocks + 4 * pid)
    r0 = tl.load(blocks + 4 * pid + 1)
    r1 = tl.load(blocks + 4 * pid + 2)
    rows = r0 + tl.arange(0, BR)
    units = tl.arange(0, HP)
    return t, rows, rows < r1, units, units < H


@triton.jit
def block_segment(blocks):
    """This program's segment (tensor, episode slot) in its ``row_blocks`` table."""
    return tl.load(blocks + 4 * tl.program_id(0) + 3)


_tables: dict[tuple, torch.Tensor] = {}


def cached_table(name: str, key: tuple, build, like: torch.Tensor, dtype: torch.dtype = torch.int32
                 ) -> torch.Tensor:
    """A small constant table on ``like``'s device, built by ``build()`` once per (name, key, dtype):
    the kernels' row-block and tile tables (and the step size) cost no upload per call.  While
    ``torch.compile`` traces an op (``like`` is fake), a fresh one, a constant of the graph: a fake
    table must never serve a real call."""
    if is_fake(like):
        return torch.tensor(build(), dtype=dtype, device=like.device)
    full_key = (name, key, like.device, dtype)
    table = _tables.get(full_key)
    if table is None:
        table = torch.tensor(build(), dtype=dtype, device=like.device)
        _tables[full_key] = table
    return table


def segment_rows(rows: Sequence[int], slots: int) -> list[int]:
    """Rows per segment: segment ``e`` is episode slot ``e % slots`` of tensor ``e // slots``, whose
    ``rows`` count one slot's (tensor by tensor, slot by slot: ``fastl2r.ops.layout``)."""
    return [n for n in rows for _ in range(slots)]


def row_blocks(rows: Sequence[int], block: int, like: torch.Tensor, slots: int = 1) -> torch.Tensor:
    """``int32 [n, 4]``: per block of at most ``block`` rows of one segment, (tensor, first row, end
    row, segment).

    Blocks never straddle two segments, so each program of a row-blocked kernel reads the
    weights of exactly one meta-net and the scales of one (tensor, slot).
    """
    def build():
        table, start = [], 0
        for e, n in enumerate(segment_rows(rows, slots)):
            table += [[e // slots, r, min(r + block, start + n), e] for r in range(start, start + n, block)]
            start += n
        return table
    return cached_table("row_blocks", (tuple(rows), block, slots), build, like)


def row_offsets(rows: Sequence[int], like: torch.Tensor, slots: int = 1) -> torch.Tensor:
    """``int32 [G·slots + 1]``: where each segment's rows start in the group, then the total."""
    def build():
        offsets = [0]
        for n in segment_rows(rows, slots):
            offsets.append(offsets[-1] + n)
        return offsets
    return cached_table("row_offsets", (tuple(rows), slots), build, like)


def next_pow2(n: int, least: int = 1) -> int:
    """The power of two a block dimension needs to cover ``n`` (``tl.arange`` sizes are powers of two)."""
    return max(triton.next_power_of_2(max(int(n), 1)), least)
