"""The grouped meta-LSTM (``fastl2r.ops.meta_lstm``) on every backend against the float64 reference.

Forward and backward at the exact shapes of every meta-net group of resnet32_gn and resnet14_gn
and at random odd shapes, float32 and float64; with 1, 2 and 3 episode slots in one call; with
the cotangent of h_new or of c_new absent (None all the way into the kernels).  Then gradcheck,
opcheck, the Triton kernels at other block sizes, and the C++ kernels' bit-for-bit independence
from the thread count.  The backends and the truth: ops_testing.py.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops
from fastl2r.ops import GroupDims
from fastl2r.ops import BACKENDS
from ops_testing import (BACKEND_DEVICES, BLOCK_SIZE_GROUPS, DTYPES, F64, RESNET32_GROUPS, SLOT_GROUPS, TOLERANCE,
                         TRITON_DEVICES, BackwardArguments, assert_matches, assert_same_bits, at_each_thread_count,
                         check_against_reference, count_triton_launches, gradients_of, make_group, op_cases,
                         poisoned_outputs, reference_outputs, require, slot_cases)  # noqa: F401

OUTPUTS = ("h_new", "c_new")
NAMES = ["h_new", "c_new", "grad_w", "grad_lstm", "grad_h", "grad_c"]


def meta_lstm_outputs(backend: str, x: dict, used=OUTPUTS) -> list[torch.Tensor]:
    """(h_new, c_new) and the gradients w.r.t. w, lstm, h, c of a random linear loss on the ``used``
    outputs."""
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("w", "lstm", "h", "c")}
    with ops.use_backend(backend):
        h_new, c_new = ops.meta_lstm(leaves["w"], x["g"], x["a_row"], x["a_shared"], leaves["lstm"], x["rows"],
                                     leaves["h"], leaves["c"])
    return [h_new, c_new, *gradients_of({"h_new": h_new, "c_new": c_new}, used, list(leaves.values()), seed=1)]


def check_meta_lstm(backend, device, dtype, dims, rows, slots=1, used=OUTPUTS):
    """``meta_lstm_outputs`` of ``backend`` on ``device`` against the float64 reference's."""
    check_against_reference(meta_lstm_outputs, NAMES, TOLERANCE["meta_lstm"][dtype], backend, device, dtype, dims, rows,
                            slots, used=used)


@pytest.mark.parametrize("backend,device,dtype,dims,rows", op_cases())
def test_meta_lstm_matches_reference(backend, device, dtype, dims, rows):
    require(backend, device)
    check_meta_lstm(backend, device, dtype, dims, rows)


@pytest.mark.parametrize("backend,device,dtype,dims,rows,slots", slot_cases())
def test_meta_lstm_episode_slots_match_reference(backend, device, dtype, dims, rows, slots):
    """S episode slots in one call: each (tensor, slot) block of rows normalised on its own, with
    its own shared input; the meta-nets' gradients summed over the slots."""
    require(backend, device)
    check_meta_lstm(backend, device, dtype, dims, rows, slots)


@pytest.mark.parametrize("used", [OUTPUTS, ("h_new",), ("c_new",)], ids=["both", "h_new", "c_new"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_meta_lstm_absent_cotangents_match_reference(monkeypatch, backend, device, dtype, used):
    """A loss on h_new alone (c' unused, as at the end of a T-BPTT window) or on c_new alone: the
    unused output's cotangent reaches the backward operator as None (no zeros are made), each
    kernel skips it (Triton: HAS_DH / HAS_DC), and the gradients are the reference's."""
    require(backend, device)
    counters = count_triton_launches(monkeypatch)
    with BackwardArguments() as seen:
        check_meta_lstm(backend, device, dtype, *SLOT_GROUPS[0].values, slots=2, used=used)
    (arguments,) = seen.calls["meta_lstm_backward"]
    assert [a is not None for a in arguments[:2]] == [name in used for name in OUTPUTS]
    if backend == "triton":
        (launch,) = counters["meta_lstm._backward_rows_kernel"].launches
        assert [launch["HAS_DH"], launch["HAS_DC"]] == [name in used for name in OUTPUTS]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_meta_lstm_gradcheck_float64(backend, device):
    require(backend, device)
    x = make_group(GroupDims(K=2, Ar=1, Ds=2, H=3), (2, 3), F64, device, slots=2)
    fast = device == "cpu" and backend == "triton"  # the interpreter: one random direction per input
    with ops.use_backend(backend):
        # w's gradient treats the RMS of its block as a constant (the contract), which
        # finite differences do not: it is checked against the reference above.
        assert torch.autograd.gradcheck(
            lambda lstm, h, c: ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], lstm, x["rows"], h, c),
            (x["lstm"].requires_grad_(), x["h"].requires_grad_(), x["c"].requires_grad_()), fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_meta_lstm_opcheck(backend, device, dtype):
    """Schema, fake kernels, autograd registration and AOT dispatch of the ``fastl2r::`` operators of
    csrc/ and of the ``fastl2r_triton::`` ones (on the CPU in the interpreter), whose backward
    operators read different saved tensors, with each cotangent present or absent.  Two episode
    slots: the ops take one slot's rows."""
    require(backend, device)
    BACKENDS[backend].load()  # registers its operators
    triton = backend == "triton"
    fl = torch.ops.fastl2r_triton if triton else torch.ops.fastl2r
    x = make_group(GroupDims(K=3, Ar=1, Ds=2, H=4), (2, 5), dtype, device, slots=2)
    rows = list(x["rows"])
    inputs = [x["w"], x["g"], x["a_row"], x["a_shared"], x["lstm"]]
    h_new, c_new, *saved = fl.meta_lstm(*inputs, rows, x["h"], x["c"])  # cpp: gates; triton: gates, scales
    saved = (h_new, *saved) if triton else (h_new, c_new, *saved)
    leaves = [t.clone().requires_grad_() for t in inputs] + [rows] + [x[k].clone().requires_grad_() for k in "hc"]
    torch.library.opcheck(fl.meta_lstm.default, tuple(leaves))
    for cotangents in ((h_new, c_new), (h_new, None), (None, c_new)):
        torch.library.opcheck(fl.meta_lstm_backward.default, (*cotangents, *inputs, rows, x["h"], x["c"], *saved))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("blocks", ["gpu", "small"])
@pytest.mark.parametrize("dims,rows,slots", BLOCK_SIZE_GROUPS)
def test_triton_meta_lstm_block_sizes_compute_the_same_function(monkeypatch, device, blocks, dims, rows, slots):
    """The CPU tests run the interpreter's block sizes; these run the GPU's and smaller ones."""
    require("triton", device)
    from fastl2r.kernels import meta_lstm as kernels

    if blocks == "small" and dims.H == 64 and device == "cpu":
        pytest.skip("covered by the GPU block sizes; too slow in the interpreter")
    chosen = kernels.GPU_BLOCKS if blocks == "gpu" else kernels.Blocks(rows=16, k=16, gates=16, columns=16)
    monkeypatch.setattr(kernels, "default_blocks", lambda _: chosen)
    check_meta_lstm("triton", device, F64, dims, rows, slots)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,rows", RESNET32_GROUPS)
def test_cpp_meta_lstm_does_not_depend_on_the_thread_count(dtype, dims, rows, slots):
    """Bit for bit, every output and gradient: the CPU kernels split their work into row blocks
    and tasks fixed by the shapes, never along a sum (their GEMM included), so no CPU and no
    thread count can change a result."""
    require("cpp", "cpu")
    x = make_group(dims, rows, dtype, slots=slots)
    assert_same_bits(at_each_thread_count(lambda: meta_lstm_outputs("cpp", x)), NAMES)
