"""The gated update (``fastl2r.ops.gated_update``) on every backend against the float64 reference.

Forward and backward at the exact shapes of every meta-net group of resnet32_gn and resnet14_gn
and at random odd shapes, float32 and float64; with 1, 2 and 3 episode slots in one call; with
the cotangent of w_new or of δ absent (None all the way into the kernels).  Then gradcheck,
opcheck, the Triton kernels at other block sizes, and the C++ kernels' bit-for-bit independence
from the thread count.  The backends and the truth: ops_testing.py.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops
from fastl2r.ops import GroupDims
from fastl2r.ops import BACKENDS
from ops_testing import (BACKEND_DEVICES, BLOCK_SIZE_GROUPS, DTYPES, F64, LR, RESNET32_GROUPS, SLOT_GROUPS,
                         TOLERANCE, TRITON_DEVICES, BackwardArguments, assert_matches, assert_same_bits,
                         at_each_thread_count, check_against_reference, count_triton_launches, gradients_of,
                         make_group, op_cases, poisoned_outputs, reference_outputs, require,  # noqa: F401
                         slot_cases)

OUTPUTS = ("w_new", "delta")
NAMES = ["w_new", "delta", "grad_h3", "grad_head", "grad_w"]


def gated_update_outputs(backend: str, x: dict, used=OUTPUTS) -> list[torch.Tensor]:
    """(w_new, δ) and the gradients w.r.t. h3, head, w of a random linear loss on the ``used`` outputs."""
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("h3", "head", "w")}
    with ops.use_backend(backend):
        w_new, delta = ops.gated_update(leaves["h3"], leaves["head"], leaves["w"], x["g"], x["rows"], LR)
    return [w_new, delta, *gradients_of({"w_new": w_new, "delta": delta}, used, list(leaves.values()), seed=2)]


def check_gated_update(backend, device, dtype, dims, rows, slots=1, used=OUTPUTS):
    """``gated_update_outputs`` of ``backend`` on ``device`` against the float64 reference's."""
    check_against_reference(gated_update_outputs, NAMES, TOLERANCE["gated_update"][dtype], backend, device,
                            dtype, dims, rows, slots, used=used)


@pytest.mark.parametrize("backend,device,dtype,dims,rows", op_cases())
def test_gated_update_matches_reference(backend, device, dtype, dims, rows):
    require(backend, device)
    check_gated_update(backend, device, dtype, dims, rows)


@pytest.mark.parametrize("backend,device,dtype,dims,rows,slots", slot_cases())
def test_gated_update_episode_slots_match_reference(backend, device, dtype, dims, rows, slots):
    """S episode slots in one call: tensor t's S·rows[t] rows use head t; its gradients summed over them."""
    require(backend, device)
    check_gated_update(backend, device, dtype, dims, rows, slots)


@pytest.mark.parametrize("used", [OUTPUTS, ("w_new",), ("delta",)], ids=["both", "w_new", "delta"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gated_update_absent_cotangents_match_reference(monkeypatch, backend, device, dtype, used):
    """A loss on w_new alone (δ unused, as in Algorithm 1) or on δ alone: the unused output's
    cotangent reaches the backward operator as None (no zeros are made), each kernel skips it
    (Triton: HAS_DW / HAS_DDELTA), and the gradients are the reference's."""
    require(backend, device)
    counters = count_triton_launches(monkeypatch)
    with BackwardArguments() as seen:
        check_gated_update(backend, device, dtype, *SLOT_GROUPS[0].values, slots=2, used=used)
    (arguments,) = seen.calls["gated_update_backward"]
    assert [a is not None for a in arguments[:2]] == [name in used for name in OUTPUTS]
    if backend == "triton":
        (launch,) = counters["gated_update._backward_rows_kernel"].launches
        assert [launch["HAS_DW"], launch["HAS_DDELTA"]] == [name in used for name in OUTPUTS]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gated_update_gradcheck_float64(backend, device):
    require(backend, device)
    x = make_group(GroupDims(K=2, Ar=1, Ds=2, H=3), (2, 3), F64, device, slots=2)
    fast = device == "cpu" and backend == "triton"  # the interpreter: one random direction per input
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda h3, head, w: ops.gated_update(h3, head, w, x["g"], x["rows"], LR),
            (x["h3"].requires_grad_(), x["head"].requires_grad_(), x["w"].requires_grad_()), fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_update_opcheck(backend, device, dtype):
    """Schema, fake kernels, autograd registration and AOT dispatch of the ``fastl2r::`` operators of
    csrc/ and of the ``fastl2r_triton::`` ones (on the CPU in the interpreter), whose backward
    operators read different saved tensors, with each cotangent present or absent.  Two episode
    slots: the ops take each tensor's rows of both slots."""
    require(backend, device)
    BACKENDS[backend].load()  # registers its operators
    triton = backend == "triton"
    fl = torch.ops.fastl2r_triton if triton else torch.ops.fastl2r
    slots = 2
    x = make_group(GroupDims(K=3, Ar=1, Ds=2, H=4), (2, 5), dtype, device, slots=slots)
    rows = [slots * n for n in x["rows"]]
    saved = () if triton else (fl.gated_update(x["h3"], x["head"], x["w"], x["g"], rows, LR)[2],)  # cpp: tanh(z)
    torch.library.opcheck(fl.gated_update.default,
                          (x["h3"].clone().requires_grad_(), x["head"].clone().requires_grad_(),
                           x["w"].clone().requires_grad_(), x["g"], rows, LR))
    for cotangents in ((x["w"], x["g"]), (x["w"], None), (None, x["g"])):
        torch.library.opcheck(fl.gated_update_backward.default,
                              (*cotangents, x["h3"], x["head"], x["g"], rows, LR, *saved))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("blocks", ["gpu", "small"])
@pytest.mark.parametrize("dims,rows,slots", BLOCK_SIZE_GROUPS)
def test_triton_gated_update_block_sizes_compute_the_same_function(monkeypatch, device, blocks, dims, rows, slots):
    """The CPU tests run the interpreter's block sizes; these run the GPU's and smaller ones."""
    require("triton", device)
    from fastl2r.kernels import gated_update as kernels

    if blocks == "small" and dims.H == 64 and device == "cpu":
        pytest.skip("covered by the GPU block sizes; too slow in the interpreter")
    chosen = kernels.GPU_BLOCKS if blocks == "gpu" else kernels.Blocks(rows=16, k=16)
    monkeypatch.setattr(kernels, "default_blocks", lambda _: chosen)
    check_gated_update("triton", device, F64, dims, rows, slots)


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,rows", RESNET32_GROUPS)
def test_cpp_gated_update_does_not_depend_on_the_thread_count(dtype, dims, rows, slots):
    """Bit for bit, every output and gradient: the CPU kernels split their work into row blocks
    and tasks fixed by the shapes, never along a sum (their GEMM included), so no CPU and no
    thread count can change a result."""
    require("cpp", "cpu")
    x = make_group(dims, rows, dtype, slots=slots)
    assert_same_bits(at_each_thread_count(lambda: gated_update_outputs("cpp", x)), NAMES)
