"""The channel means (``fastl2r.ops.channel_means``) on every backend against the float64 reference.

Activations of any N, C and spatial size, contiguous, channels_last and neither, a tensor listed
twice, float32 and float64; opcheck; one Triton launch for the whole list; the C++ kernel's
bit-for-bit independence from the thread count.  The backends and the truth: ops_testing.py.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops
from fastl2r.ops import reference
from fastl2r.ops import BACKENDS
from ops_testing import (BACKEND_DEVICES, DTYPES, F32, F64, TOLERANCE, assert_matches, assert_same_bits,
                         at_each_thread_count, count_triton_launches, launch_count, poisoned_outputs,  # noqa: F401
                         require)


def activations(dtype, device, seed=0) -> list[torch.Tensor]:
    """Activations of any N, C, H, W (one row, one channel, sizes off every block size),
    contiguous, channels_last and neither."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 32, 32), (4, 16, 32, 32), (4, 16, 16, 16), (4, 64, 8, 8), (4, 64), (1, 5, 3, 1), (3, 2, 7),
              (37, 3, 9, 9), (1, 1, 1, 1)]
    xs = [(torch.randn(s, generator=gen, dtype=F64) + 0.5).to(dtype=dtype, device=device) for s in shapes]
    channels_last = [(torch.randn(s, generator=gen, dtype=F64) - 0.5).to(dtype=dtype, device=device)
                     .contiguous(memory_format=torch.channels_last) for s in ((3, 17, 9, 7), (2, 1, 3, 3))]
    # A layer's output is the next layer's input: the same tensor listed twice.
    return xs + channels_last + [xs[1], xs[1].transpose(2, 3), xs[0][:, 1:],
                                 xs[1].contiguous(memory_format=torch.channels_last)]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_means_matches_reference(backend, device, dtype):
    require(backend, device)
    xs = activations(dtype, device)
    assert xs[-1].is_contiguous(memory_format=torch.channels_last) and not xs[-1].is_contiguous()
    with ops.use_backend(backend):
        actual = ops.channel_means(xs)
    expected = reference.channel_means([x.double().cpu() for x in xs])
    assert actual.dtype == dtype and actual.device.type == device
    assert_matches(actual, expected, "means", TOLERANCE["channel_means"][dtype])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_means_opcheck(backend, device, dtype):
    """Schema, fake kernel and AOT dispatch of ``fastl2r::channel_means`` and ``fastl2r_triton::channel_means``."""
    require(backend, device)
    BACKENDS[backend].load()  # registers its operators
    fl = torch.ops.fastl2r_triton if backend == "triton" else torch.ops.fastl2r
    x = torch.randn(3, 5, 4, dtype=dtype, device=device)
    torch.library.opcheck(fl.channel_means.default, ([x, x.transpose(0, 1)],))


def test_triton_channel_means_is_one_launch(monkeypatch):
    require("triton", "cpu")
    counters = count_triton_launches(monkeypatch)
    with ops.use_backend("triton"):
        ops.channel_means(activations(F32, "cpu"))
    assert launch_count(counters) == 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_channel_means_do_not_depend_on_the_thread_count(dtype):
    # Large enough that the CPU kernel splits the batch into blocks, the last one shorter.
    require("cpp", "cpu")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=gen, dtype=F64).add(0.5).to(dtype) for s in ((70, 16, 16, 16), (129, 64, 8, 8))]
    xs += activations(dtype, "cpu")
    with ops.use_backend("cpp"):
        results = at_each_thread_count(lambda: [ops.channel_means(xs)])
    assert_same_bits(results, ["means"])
    assert_matches(results[0][0], reference.channel_means([x.double() for x in xs]), "means",
                   TOLERANCE["channel_means"][dtype])
