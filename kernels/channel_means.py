"""Per-channel means of a whole list of activations in one launch (DESIGN §3.1).

Every tensor ``[N, C, *spatial]`` is seen as ``[N, C, S]`` (its spatial dims merged,
which is a view for contiguous and channels_last tensors; any other layout is
copied first).  A per-call pointer table and a cached per-tensor table of sizes and
strides let one launch cover the whole list:

* channel-major tensors (``S`` contiguous): one program per channel, summing
  ``[N_BLOCK, S_BLOCK]`` tiles whose rows are contiguous runs of the channel;
* channels_last tensors (``C`` contiguous): one program per block of ``C_BLOCK``
  channels, summing ``[S_BLOCK, C_BLOCK]`` tiles whose rows are contiguous runs of
  channels, so loads stay coalesced in both layouts.

Each program writes its means directly (fp32 accumulation, fp64 for fp64 inputs; no
atomics, deterministic):
one launch, every input element read once, every mean written once.  Parallelism is
the number of channel items, which suits its use (every layer of a network, thousands
of channels); a list of a few channels with huge ``N·S`` gets few programs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from . import TL_DTYPES, cached_table, compute_dtype, new_output

N_BLOCK = 16
S_BLOCK = 64
C_BLOCK = 16

# Columns of the per-tensor table.
_META = ("N", "C", "S", "stride_n", "stride_c", "stride_s", "out_offset", "channels_last")

@triton.jit
def _channel_major_mean(x, out, c0, N, S, stride_n, stride_c, stride_s, inv_count, ACC: tl.constexpr,
                        N_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr):
    """The mean of channel ``c0``, summing ``[N_BLOCK, S_BLOCK]`` tiles (rows: runs of the channel)."""
    n_range = tl.arange(0, N_BLOCK)
    s_range = tl.arange(0, S_BLOCK)
    acc = tl.zeros([N_BLOCK, S_BLOCK], dtype=ACC)
    base = x + c0 * stride_c
    for n0 in range(0, N, N_BLOCK):
        n = n0 + n_range
        for s0 in range(0, S, S_BLOCK):
            s = s0 + s_range
            mask = (n[:, None] < N) & (s[None, :] < S)
            acc += tl.load(base + n[:, None] * stride_n + s[None, :] * stride_s, mask=mask, other=0.0).to(ACC)
    tl.store(out + c0, tl.sum(tl.sum(acc, axis=1), axis=0) * inv_count)


@triton.jit
def _channels_last_mean(x, out, c0, N, C, S, stride_n, stride_c, stride_s, inv_count, ACC: tl.constexpr,
                        S_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
    """The means of channels ``c0 .. c0 + C_BLOCK``, summing ``[S_BLOCK, C_BLOCK]`` tiles (rows: runs
    of channels)."""
    c = c0 + tl.arange(0, C_BLOCK)
    s_range = tl.arange(0, S_BLOCK)
    acc = tl.zeros([S_BLOCK, C_BLOCK], dtype=ACC)
    for n in range(0, N):
        base = x + n * stride_n
        for s0 in range(0, S, S_BLOCK):
            s = s0 + s_range
            mask = (s[:, None] < S) & (c[None, :] < C)
            acc += tl.load(base + s[:, None] * stride_s + c[None, :] * stride_c, mask=mask, other=0.0).to(ACC)
    tl.store(out + c, tl.sum(acc, axis=0) * inv_count, mask=c < C)


@triton.jit
def _channel_means_kernel(pointers, meta, items, out, DTYPE: tl.constexpr, ACC: tl.constexpr,
                          META_COLS: tl.constexpr,
                          N_BLOCK: tl.constexpr, S_BLOCK: tl.constexpr, C_BLOCK: tl.constexpr):
    item = tl.program_id(0)
    tensor = tl.load(items + 2 * item)
    c0 = tl.load(items + 2 * item + 1).to(tl.int64)
    row = meta + tensor * META_COLS
    N = tl.load(row + 0)
    C = tl.load(row + 1)
    S = tl.load(row + 2)
    stride_n = tl.load(row + 3)
    stride_c = tl.load(row + 4)
    stride_s = tl.load(row + 5)
    out_offset = tl.load(row + 6)
    channels_last = tl.load(row + 7)
    x = tl.load(pointers + tensor).to(tl.pointer_type(DTYPE))
    inv_count = 1.0 / (N * S).to(ACC)
    if channels_last == 0:
        _channel_major_mean(x, out + out_offset, c0, N, S, stride_n, stride_c, stride_s, inv_count, ACC,
                            N_BLOCK, S_BLOCK)
    else:
        _channels_last_mean(x, out + out_offset, c0, N, C, S, stride_n, stride_c, stride_s, inv_count, ACC,
                            S_BLOCK, C_BLOCK)


def _as_ncs(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[N, C, S]``, its spatial dims merged: a view when they are laid out as one
    strided dim (contiguous, channels_last), else a contiguous copy."""
    spatial = [(n, s) for n, s in zip(x.shape[2:], x.stride()[2:]) if n > 1]
    if all(spatial[i][1] == spatial[i + 1][1] * spatial[i + 1][0] for i in range(len(spatial) - 1)):
        size = 1
        for n, _ in spatial:
            size *= n
        stride = spatial[-1][1] if spatial else 1
        return x.as_strided((x.shape[0], x.shape[1], size), (x.stride(0), x.stride(1), stride))
    return x.contiguous().flatten(2)


def _tables(views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The per-tensor table and the work items, cached per list signature (sizes, strides)."""
    signature = tuple((tuple(v.shape), tuple(v.stride())) for v in views)

    def meta():
        rows, offset = [], 0
        for (N, C, S), (sn, sc, ss) in signature:
            rows.append([N, C, S, sn, sc, ss, offset, int(sc == 1 and C > 1)])
            offset += C
        return rows

    def items():
        out = []
        for t, ((N, C, S), (sn, sc, ss)) in enumerate(signature):
            step = C_BLOCK if (sc == 1 and C > 1) else 1
            out += [[t, c] for c in range(0, C, step)]
        return out

    meta_table = cached_table("channel_means_meta", signature, meta, views[0], torch.int64)
    item_table = cached_table("channel_means_items", signature, items, views[0])
    return meta_table, item_table, sum(C for (N, C, S), _ in signature)


def channel_count(activations: Sequence[torch.Tensor]) -> int:
    """The length of the op's output: every activation's channels."""
    return sum(x.shape[1] for x in activations)


def launch_channel_means(activations: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Write every per-channel mean of ``activations`` (one dtype, one device) into ``out [sum C]``."""
    views = [_as_ncs(x) for x in activations]
    device = views[0].device
    meta_table, item_table, total = _tables(views)
    if out.shape != (total,):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected ({total},)")
    pointers = torch.tensor([v.data_ptr() for v in views], dtype=torch.int64)
    if device.type != "cpu":
        pointers = pointers.to(device, non_blocking=True)
    _channel_means_kernel[(item_table.shape[0],)](
        pointers, meta_table, item_table, out, DTYPE=TL_DTYPES[views[0].dtype],
        ACC=TL_DTYPES[compute_dtype(views[0].dtype)], META_COLS=len(_META),
        N_BLOCK=N_BLOCK, S_BLOCK=S_BLOCK, C_BLOCK=C_BLOCK)
    return out


# A custom op, opaque to torch.compile, not a triton_op (``define_op``): the kernel reaches the
# activations through a table of their addresses, which a traced graph cannot hold.
@torch.library.custom_op("fastl2r_triton::channel_means", mutates_args=())
def channel_means(activations: list[torch.Tensor]) -> torch.Tensor:
    """Per-channel means (over every dim but 1) of each activation, concatenated; no gradient."""
    return launch_channel_means(activations, new_output((channel_count(activations),), activations[0]))


@channel_means.register_fake
def _(activations):
    first = activations[0]
    return first.new_empty(channel_count(activations))
