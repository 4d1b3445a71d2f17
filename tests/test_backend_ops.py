"""Every backend of the fused ops against the plain-PyTorch reference.

Backends: cpp (CPU), cuda (GPU), triton on the CPU (Triton's interpreter, which
conftest.py switches on where there is no GPU) and triton on CUDA (compiled).  Every op,
forward and backward, at the exact shapes of every meta-net group of resnet32_gn and
resnet14_gn and at random odd shapes, float32 and float64, and with 1, 2 and 3 episode
slots in one call; the truth is the reference evaluated in float64 on the same inputs,
within the bound ``TOLERANCE`` states per op.
Every output and scratch buffer is NaN-filled when allocated (FASTL2R_POISON_OUTPUTS), so
an element a kernel forgets to write fails.  The interpreter runs each Triton program at
Python speed: there the network groups run once, in float32, and the odd shapes in both
dtypes.  Then gradcheck, opcheck, torch.compile, block sizes, launch counts, dispatch, a
T-BPTT window of chained MetaLearner steps, compilation of every Triton kernel for sm_90
(which needs no GPU), and the C++ ops' bit-for-bit independence from the thread count.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from fastl2r import ops
from fastl2r.meta import MetaLearner
from fastl2r.models import resnet8_gn, resnet14_gn, resnet32_gn
from fastl2r.ops import GroupDims, reference, unpack_head
from fastl2r.ops.registry import BACKENDS

LR = 0.1
F32, F64 = torch.float32, torch.float64
CPP = pytest.param("cpp", "cpu", id="cpp")
CUDA = pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda)
TRITON_CPU = pytest.param("triton", "cpu", id="triton-cpu")
TRITON_CUDA = pytest.param("triton", "cuda", id="triton-cuda", marks=pytest.mark.cuda)
BACKEND_DEVICES = [CPP, CUDA, TRITON_CPU, TRITON_CUDA]
COMPILED_BACKEND_DEVICES = [CPP, CUDA, TRITON_CUDA]
TRITON_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]

# Error bound of each op against the float64 reference, relative to the largest magnitude of
# each output.  float32: rounding of K-long dot products (K up to 1217) and of exp, measured at
# <= 4e-6 on CPU; float64: the same at float64 precision.
TOLERANCE = {
    "meta_lstm": {F32: 5e-5, F64: 1e-10},
    "gated_update": {F32: 2e-5, F64: 1e-10},
    "channel_means": {F32: 1e-5, F64: 1e-12},
}


def _resnet_groups() -> list:
    groups = []
    for name, model in (("resnet32_gn", resnet32_gn(3, [5])), ("resnet14_gn", resnet14_gn(1, [2]))):
        for g in MetaLearner(model).groups:
            groups.append(pytest.param(g.dims, g.rows, id=f"{name}-g{g.index}-K{g.dims.K}"))
    return groups


RESNET_GROUPS = _resnet_groups()
ODD_GROUPS = [
    pytest.param(GroupDims(K=5, Ar=1, Ds=7, H=8), (3, 1, 33), id="odd-conv"),
    pytest.param(GroupDims(K=1, Ar=2, Ds=0, H=4), (1,), id="one-row"),
    pytest.param(GroupDims(K=3, Ar=0, Ds=0, H=5), (70, 2), id="no-activations"),
    pytest.param(GroupDims(K=2, Ar=3, Ds=1, H=3), (40, 1, 17), id="odd-gn"),
]


def _op_cases() -> list:
    """(backend, device, dtype, dims, rows) for every backend, dtype and group, but the network
    groups only in float32 on the interpreter; the backends of one input side by side, so that
    they share its reference outputs (``reference_outputs``)."""
    cases = []
    for group in RESNET_GROUPS + ODD_GROUPS:
        for dt in DTYPES:
            for bd in BACKEND_DEVICES:
                if bd is TRITON_CPU and dt.values[0] == F64 and group in RESNET_GROUPS:
                    continue
                cases.append(pytest.param(*bd.values, *dt.values, *group.values, marks=bd.marks,
                                          id=f"{bd.id}-{dt.id}-{group.id}"))
    return cases


OP_CASES = _op_cases()

# Episode slots (S = w's rows / sum(rows)): small groups, so that the interpreter stays quick.
SLOT_GROUPS = [
    pytest.param(GroupDims(K=5, Ar=1, Ds=7, H=6), (3, 1, 40), id="conv"),  # a slot of 40 rows: 2 CPU row blocks
    pytest.param(GroupDims(K=1, Ar=2, Ds=0, H=5), (4, 2, 7), id="gn"),
]
SLOTS = (1, 2, 3)


def _slot_cases() -> list:
    """(backend, device, dtype, dims, rows, slots), the backends of one input side by side."""
    return [pytest.param(*bd.values, *dt.values, *group.values, slots, marks=bd.marks,
                         id=f"{bd.id}-{dt.id}-{group.id}-S{slots}")
            for group in SLOT_GROUPS for slots in SLOTS for dt in DTYPES for bd in BACKEND_DEVICES]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("FASTL2R_POISON_OUTPUTS", "1")


def require(backend: str, device: str) -> None:
    reason = BACKENDS[backend].unavailable(device)
    if reason is not None:
        pytest.skip(reason)


def make_group(dims: GroupDims, rows, dtype=F64, device="cpu", seed=0, slots=1) -> dict:
    """Random inputs of one group of ``slots`` episode slots (``rows`` counts one slot's) at
    realistic scales (a trained-looking head, live state)."""
    gen = torch.Generator().manual_seed(seed)
    R, G = slots * sum(rows), len(rows)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype=dtype, device=device)

    bound = dims.H ** -0.5
    head = randn(G, dims.head_size, scale=0.3)
    _, b_out, scale = unpack_head(head, GroupDims(dims.K, 0, 0, dims.H))
    b_out.add_(1.0)
    scale.fill_(1.3)
    return dict(w=randn(R, dims.K, scale=0.1), g=randn(R, dims.K, scale=0.01), a_row=randn(R, dims.Ar),
                a_shared=randn(G * slots, dims.Ds), lstm=randn(G, dims.lstm_size, scale=bound),
                h=randn(3, R, dims.H, scale=0.5), c=randn(3, R, dims.H, scale=0.5),
                h3=randn(R, dims.H, scale=0.5), head=head, rows=tuple(rows))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str, tol: float) -> None:
    """``actual`` (in its dtype) against the float64 truth, relative to the truth's scale."""
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{name}: {m}")


def meta_lstm_outputs(backend: str, x: dict):
    """(h_new, c_new) and the gradients w.r.t. w, lstm, h, c of a random linear loss."""
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("w", "lstm", "h", "c")}
    with ops.use_backend(backend):
        h_new, c_new = ops.meta_lstm(leaves["w"], x["g"], x["a_row"], x["a_shared"], leaves["lstm"], x["rows"],
                                     leaves["h"], leaves["c"])
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=F64).to(t) for t in (h_new, c_new)]
    grads = torch.autograd.grad((h_new, c_new), list(leaves.values()), cotangents)
    return [h_new, c_new, *grads]


def gated_update_outputs(backend: str, x: dict):
    """(w_new, δ) and the gradients w.r.t. h3, head, w of a random linear loss."""
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("h3", "head", "w")}
    with ops.use_backend(backend):
        w_new, delta = ops.gated_update(leaves["h3"], leaves["head"], leaves["w"], x["g"], x["rows"], LR)
    gen = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=F64).to(t) for t in (w_new, delta)]
    grads = torch.autograd.grad((w_new, delta), list(leaves.values()), cotangents)
    return [w_new, delta, *grads]


def as_float64(x: dict) -> dict:
    return {k: v.detach().double().cpu() if isinstance(v, torch.Tensor) else v for k, v in x.items()}


_last_reference: dict = {}


def reference_outputs(outputs, dims: GroupDims, rows, dtype: torch.dtype, slots: int) -> list[torch.Tensor]:
    """``outputs("reference", ·)`` on the float64 copy of ``make_group(dims, rows, dtype, slots=slots)``,
    which does not depend on the device: computed once for the backends tested one after another."""
    key = (outputs.__name__, dims, tuple(rows), dtype, slots)
    if key not in _last_reference:
        _last_reference.clear()
        _last_reference[key] = outputs("reference", as_float64(make_group(dims, rows, dtype, slots=slots)))
    return _last_reference[key]


def check_meta_lstm(backend, device, dtype, dims, rows, slots=1):
    x = make_group(dims, rows, dtype, device, slots=slots)
    actual = meta_lstm_outputs(backend, x)
    expected = reference_outputs(meta_lstm_outputs, dims, rows, dtype, slots)
    for name, a, e in zip(["h_new", "c_new", "grad_w", "grad_lstm", "grad_h", "grad_c"], actual, expected):
        assert a.dtype == dtype and a.device.type == device
        assert_matches(a, e, name, TOLERANCE["meta_lstm"][dtype])


def check_gated_update(backend, device, dtype, dims, rows, slots=1):
    x = make_group(dims, rows, dtype, device, slots=slots)
    actual = gated_update_outputs(backend, x)
    expected = reference_outputs(gated_update_outputs, dims, rows, dtype, slots)
    for name, a, e in zip(["w_new", "delta", "grad_h3", "grad_head", "grad_w"], actual, expected):
        assert a.dtype == dtype and a.device.type == device
        assert_matches(a, e, name, TOLERANCE["gated_update"][dtype])


@pytest.mark.parametrize("backend,device,dtype,dims,rows", OP_CASES)
def test_meta_lstm_matches_reference(backend, device, dtype, dims, rows):
    require(backend, device)
    check_meta_lstm(backend, device, dtype, dims, rows)


@pytest.mark.parametrize("backend,device,dtype,dims,rows", OP_CASES)
def test_gated_update_matches_reference(backend, device, dtype, dims, rows):
    require(backend, device)
    check_gated_update(backend, device, dtype, dims, rows)


@pytest.mark.parametrize("backend,device,dtype,dims,rows,slots", _slot_cases())
def test_episode_slots_match_reference(backend, device, dtype, dims, rows, slots):
    """S episode slots in one call: each (tensor, slot) block of rows normalised on its own, with
    its own shared input; the meta-nets' gradients summed over the slots."""
    require(backend, device)
    check_meta_lstm(backend, device, dtype, dims, rows, slots)
    check_gated_update(backend, device, dtype, dims, rows, slots)


def _activations(dtype, device, seed=0) -> list[torch.Tensor]:
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
    xs = _activations(dtype, device)
    assert xs[-1].is_contiguous(memory_format=torch.channels_last) and not xs[-1].is_contiguous()
    with ops.use_backend(backend):
        actual = ops.channel_means(xs)
    expected = reference.channel_means([x.double().cpu() for x in xs])
    assert actual.dtype == dtype and actual.device.type == device
    assert_matches(actual, expected, "means", TOLERANCE["channel_means"][dtype])


THREAD_COUNTS = (1, 2, 3)  # 3: more threads than this machine may have cores, and an odd split


def at_each_thread_count(compute) -> list:
    """``compute()`` once with each of ``THREAD_COUNTS`` intra-op threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in THREAD_COUNTS:
            torch.set_num_threads(n)
            results.append(compute())
    finally:
        torch.set_num_threads(threads)
    return results


def assert_same_bits(results: list, names: list[str]) -> None:
    for n, outputs in zip(THREAD_COUNTS[1:], results[1:]):
        for name, one, other in zip(names, results[0], outputs, strict=True):
            assert torch.equal(one, other), (f"{name} differs between {THREAD_COUNTS[0]} and {n} threads, by up to "
                                             f"{(one.double() - other.double()).abs().max().item():.3g}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_channel_means_do_not_depend_on_the_thread_count(dtype):
    # Large enough that the CPU kernel splits the batch into blocks, the last one shorter.
    require("cpp", "cpu")
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(s, generator=gen, dtype=F64).add(0.5).to(dtype) for s in ((70, 16, 16, 16), (129, 64, 8, 8))]
    xs += _activations(dtype, "cpu")
    with ops.use_backend("cpp"):
        results = at_each_thread_count(lambda: [ops.channel_means(xs)])
    assert_same_bits(results, ["means"])
    assert_matches(results[0][0], reference.channel_means([x.double() for x in xs]), "means",
                   TOLERANCE["channel_means"][dtype])


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,rows", [g for g in RESNET_GROUPS if g.id.startswith("resnet32_gn")])
def test_cpp_meta_lstm_and_gated_update_do_not_depend_on_the_thread_count(dtype, dims, rows, slots):
    """Bit for bit, every output and gradient: the CPU kernels split their work into row blocks
    and tasks fixed by the shapes, never along a sum (their GEMM included), so no CPU and no
    thread count can change a result."""
    require("cpp", "cpu")
    x = make_group(dims, rows, dtype, slots=slots)
    results = at_each_thread_count(lambda: [*meta_lstm_outputs("cpp", x), *gated_update_outputs("cpp", x)])
    assert_same_bits(results, ["h_new", "c_new", "meta_lstm grad_w", "grad_lstm", "grad_h", "grad_c", "w_new", "delta",
                               "grad_h3", "grad_head", "gated_update grad_w"])


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradcheck_float64(backend, device):
    require(backend, device)
    x = make_group(GroupDims(K=2, Ar=1, Ds=2, H=3), (2, 3), F64, device, slots=2)
    rows = x["rows"]
    fast = device == "cpu" and backend == "triton"  # the interpreter: one random direction per input
    with ops.use_backend(backend):
        # w's gradient treats the RMS of its block as a constant (the contract), which
        # finite differences do not: it is checked against the reference above.
        assert torch.autograd.gradcheck(
            lambda lstm, h, c: ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], lstm, rows, h, c),
            (x["lstm"].requires_grad_(), x["h"].requires_grad_(), x["c"].requires_grad_()), fast_mode=fast)
        assert torch.autograd.gradcheck(
            lambda h3, head, w: ops.gated_update(h3, head, w, x["g"], rows, LR),
            (x["h3"].requires_grad_(), x["head"].requires_grad_(), x["w"].requires_grad_()), fast_mode=fast)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(backend, device, dtype):
    """Schema, fake kernels, autograd registration and AOT dispatch of every registered op: the
    ``fastl2r::`` operators of csrc/ and the ``fastl2r_triton::`` ones (on the CPU in the
    interpreter), whose backward operators read different saved tensors.  Two episode slots: the
    meta-LSTM ops take one slot's rows, the gated update's each tensor's rows of both slots."""
    require(backend, device)
    BACKENDS[backend].load()  # registers its operators
    triton = backend == "triton"
    fl = torch.ops.fastl2r_triton if triton else torch.ops.fastl2r
    slots = 2
    x = make_group(GroupDims(K=3, Ar=1, Ds=2, H=4), (2, 5), dtype, device, slots=slots)
    rows, head_rows = list(x["rows"]), [slots * n for n in x["rows"]]
    lstm_args = [x["w"], x["g"], x["a_row"], x["a_shared"], x["lstm"], rows, x["h"], x["c"]]
    head_args = [x["h3"], x["head"], x["w"], x["g"], head_rows, LR]
    h_new, c_new, *saved = fl.meta_lstm(*lstm_args)  # cpp: gates; triton: gates, scales
    lstm_saved = (h_new, *saved) if triton else (h_new, c_new, *saved)
    head_saved = () if triton else (fl.gated_update(*head_args)[2],)  # cpp: tanh(z)
    torch.library.opcheck(fl.channel_means.default, ([x["h"], x["c"].transpose(0, 1)],))
    grad = [t.clone().requires_grad_() for t in lstm_args[:5]] + [rows] + [x["h"].clone().requires_grad_(),
                                                                          x["c"].clone().requires_grad_()]
    torch.library.opcheck(fl.meta_lstm.default, tuple(grad))
    torch.library.opcheck(fl.meta_lstm_backward.default,
                          (h_new, c_new, *lstm_args[:5], rows, x["h"], x["c"], *lstm_saved))
    torch.library.opcheck(fl.gated_update.default,
                          (x["h3"].clone().requires_grad_(), x["head"].clone().requires_grad_(),
                           x["w"].clone().requires_grad_(), x["g"], head_rows, LR))
    for grad_w_new in (x["w"], None) if triton else (x["w"],):  # Triton's takes None for a zero gradient
        torch.library.opcheck(fl.gated_update_backward.default,
                              (grad_w_new, x["g"], x["h3"], x["head"], x["g"], head_rows, LR, *head_saved))


def test_torch_compile_fullgraph():
    require("cpp", "cpu")
    from fastl2r.ops import cpp_backend

    x = make_group(GroupDims(K=3, Ar=1, Ds=2, H=4), (2, 5))

    def step(w, lstm, head, h, c):
        h_new, c_new = cpp_backend.meta_lstm(w, x["g"], x["a_row"], x["a_shared"], lstm, x["rows"], h, c)
        w_new, delta = cpp_backend.gated_update(h_new[2], head, w, x["g"], x["rows"], LR)
        return (w_new ** 2).sum() + delta.sum() + c_new.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [x[k].clone().requires_grad_() for k in ("w", "lstm", "head", "h", "c")]
    eager = [x[k].clone().requires_grad_() for k in ("w", "lstm", "head", "h", "c")]
    loss, expected = compiled(*leaves), step(*eager)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad)


def tiny_network() -> nn.Module:
    """Two convs and two GroupNorms: three meta-net groups of a few rows each."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.Conv2d(4, 5, 3, bias=False), nn.GroupNorm(1, 5))


def metalearner_step_loss(meta: MetaLearner, weights, grads, means, h, c) -> torch.Tensor:
    """A loss on one MetaLearner step's new weights, δ and state (every output in use)."""
    from fastl2r.meta.metalearner import MetaState

    new_weights, state, deltas = meta.step(weights, grads, means, MetaState(list(h), list(c)))
    return (sum((w ** 2).sum() for w in new_weights) + sum(d.sum() for d in deltas)
            + sum(s.sum() for s in state.h) + sum(s.sum() for s in state.c))


@pytest.mark.parametrize("device,network", [
    pytest.param("cpu", "tiny", id="cpu-interpreter-aot_eager"),
    pytest.param("cuda", "resnet32_gn", id="cuda-inductor", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph_metalearner_step_triton(device, network):
    """``torch.compile(fullgraph=True)`` traces a whole MetaLearner step through the Triton ops,
    from a cold backend cache (the registry resolves the backend while tracing), and
    computes what eager mode does, forward and backward."""
    require("triton", device)
    from fastl2r.ops import registry

    torch.manual_seed(0)
    model = tiny_network() if network == "tiny" else resnet32_gn(3, [5])
    meta = MetaLearner(model).double().to(device)
    for p in meta.head:
        p.data.add_(torch.randn_like(p) * 0.05)
    weights = [f.detach().double().to(device) for f in meta.flatten(dict(model.named_parameters()))]
    grads = [torch.randn_like(w) * 0.01 for w in weights]
    means = torch.randn(meta.channel_count, dtype=F64, device=device)
    state = meta.initial_state(device, F64)
    step = lambda *args: metalearner_step_loss(meta, *args)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    registry._cache.clear()
    results = []
    for fn in (compiled, step):
        leaves = [w.clone().requires_grad_() for w in weights]
        with ops.use_backend("triton"):
            loss = fn(leaves, grads, means, state.h, state.c)
        results.append([loss, *torch.autograd.grad(loss, list(meta.parameters()) + leaves)])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("blocks", ["gpu", "small"])
@pytest.mark.parametrize("dims,rows,slots", [pytest.param(*g.values, 1, id=g.id) for g in ODD_GROUPS] + [
    pytest.param(GroupDims(K=37, Ar=1, Ds=70, H=64), (17, 40), 1, id="wide-conv"),
    pytest.param(GroupDims(K=37, Ar=1, Ds=5, H=12), (17, 3), 2, id="wide-conv-2-slots"),
    pytest.param(GroupDims(K=2, Ar=3, Ds=1, H=3), (40, 1, 17), 3, id="odd-gn-3-slots")])
def test_triton_block_sizes_compute_the_same_function(monkeypatch, device, blocks, dims, rows, slots):
    """The CPU tests run the interpreter's block sizes; these run the GPU's and smaller ones,
    so every last-block mask is exercised on shapes that are no multiple of any block."""
    require("triton", device)
    from fastl2r.kernels import gated_update as gated_update_kernels
    from fastl2r.kernels import meta_lstm as meta_lstm_kernels

    if blocks == "small" and dims.H == 64 and device == "cpu":
        pytest.skip("covered by the GPU block sizes; too slow in the interpreter")
    chosen = {"gpu": (meta_lstm_kernels.GPU_BLOCKS, gated_update_kernels.GPU_BLOCKS),
              "small": (meta_lstm_kernels.Blocks(rows=16, k=16, gates=16, columns=16),
                        gated_update_kernels.Blocks(rows=16, k=16))}[blocks]
    for module, bs in zip((meta_lstm_kernels, gated_update_kernels), chosen):
        monkeypatch.setattr(module, "default_blocks", lambda _, bs=bs: bs)
    check_meta_lstm("triton", device, F64, dims, rows, slots)
    check_gated_update("triton", device, F64, dims, rows, slots)


class LaunchCounter:
    """Stands in for a Triton kernel: counts its launches (and runs them unless ``run`` is False)."""

    def __init__(self, kernel, run: bool = True):
        self.kernel, self.run, self.launches = kernel, run, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid] if self.run else (lambda *args, **kwargs: None)


def count_triton_launches(monkeypatch, run: bool = True) -> list[LaunchCounter]:
    from fastl2r.kernels import channel_means, gated_update, meta_lstm

    counters = []
    for module in (channel_means, gated_update, meta_lstm):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            counters.append(LaunchCounter(getattr(module, name), run))
            monkeypatch.setattr(module, name, counters[-1])
    return counters


def test_triton_channel_means_is_one_launch(monkeypatch):
    require("triton", "cpu")
    counters = count_triton_launches(monkeypatch)
    xs = _activations(F32, "cpu")
    with ops.use_backend("triton"):
        ops.channel_means(xs)
    assert sum(c.launches for c in counters) == 1


def test_triton_launches_do_not_grow_with_depth(monkeypatch):
    """One MetaLearner step, forward and backward, launches the same kernels for resnet8_gn
    and resnet32_gn: per group, meta-LSTM 2 + 2 and gated update 1 + 2 (kernels not run)."""
    require("triton", "cpu")
    counters = count_triton_launches(monkeypatch, run=False)
    launches = []
    for model in (resnet8_gn(3, [5]), resnet32_gn(3, [5])):
        meta = MetaLearner(model)
        weights = [f.detach().requires_grad_() for f in meta.flatten(dict(model.named_parameters()))]
        state = meta.initial_state()
        before = sum(c.launches for c in counters)
        with ops.use_backend("triton"):
            loss = metalearner_step_loss(meta, weights, [torch.zeros_like(w) for w in weights],
                                         torch.zeros(meta.channel_count), state.h, state.c)
            torch.autograd.grad(loss, list(meta.parameters()) + weights)
        launches.append(sum(c.launches for c in counters) - before)
        assert launches[-1] == 7 * len(meta.groups)
    assert launches[0] == launches[1]


@pytest.mark.parametrize("backend,device,network", [
    *[pytest.param(*bd.values, "resnet14_gn", marks=bd.marks, id=f"{bd.id}-resnet14_gn")
      for bd in COMPILED_BACKEND_DEVICES],
    *[pytest.param(*bd.values, "tiny", marks=bd.marks, id=f"{bd.id}-tiny") for bd in BACKEND_DEVICES]])
def test_tbptt_window_of_metalearner_steps(backend, device, network):
    """Three chained MetaLearner steps (weights and state of step t+1 are outputs of step
    t), then the meta-gradient of a loss on the last weights w.r.t. every θ."""
    require(backend, device)
    torch.manual_seed(0)
    model = (resnet14_gn(1, [2]) if network == "resnet14_gn" else tiny_network()).double().to(device)
    grads_by_backend = []
    for name in (backend, "reference"):
        torch.manual_seed(1)
        meta = MetaLearner(model).double().to(device)
        for p in meta.head:
            p.data.add_(torch.randn_like(p) * 0.05)
        weights = [f.detach() for f in meta.flatten(dict(model.named_parameters()))]
        state = meta.initial_state(device, F64)
        gen = torch.Generator().manual_seed(2)
        with ops.use_backend(name):
            for _ in range(3):
                grads = [(torch.randn(w.shape, generator=gen, dtype=F64) * 0.01).to(device) for w in weights]
                means = torch.randn(meta.channel_count, generator=gen, dtype=F64).to(device)
                weights, state, _ = meta.step(weights, grads, means, state)
        loss = sum((w ** 2).sum() for w in weights) + sum(h.sum() for h in state.h)
        grads_by_backend.append(torch.autograd.grad(loss, list(meta.parameters())))
    for actual, expected in zip(*grads_by_backend):
        assert_matches(actual, expected, "meta-gradient", TOLERANCE["meta_lstm"][F64])


# ----- dispatch -----
def test_cuda_tensors_get_triton_by_default(monkeypatch):
    from fastl2r.ops import registry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FASTL2R_BACKEND", raising=False)
    assert registry.backend_name("cuda") == "triton"


def test_fastl2r_backend_forces_a_backend(monkeypatch):
    xs = [torch.randn(2, 3, 4, 4)]
    monkeypatch.setenv("FASTL2R_BACKEND", "reference")
    assert ops.backend_name("cpu") == "reference"
    monkeypatch.setenv("FASTL2R_BACKEND", "cuda")
    with pytest.raises(ops.BackendError, match="'cuda' was requested but cannot run: it runs on cuda tensors"):
        ops.channel_means(xs)
    monkeypatch.setenv("FASTL2R_BACKEND", "triton")
    with ops.use_backend("reference"):  # use_backend wins over the environment
        assert ops.backend_name("cpu") == "reference"
    require("triton", "cpu")
    counters = count_triton_launches(monkeypatch)
    torch.testing.assert_close(ops.channel_means(xs), reference.channel_means(xs))
    assert ops.backend_name("cpu") == "triton" and sum(c.launches for c in counters) == 1


# ----- compilation for a GPU this machine may not have -----
def test_triton_kernels_compile_for_sm90_within_resources():
    """Every kernel, as the launchers specialise it (float32, GPU block sizes) for resnet32_gn's
    GroupNorm group and its widest conv group (K = 576, D = 1217), compiles for sm_90 (H100);
    none spills and none needs more shared memory than an H100 block has (227 KiB).  The other
    groups only change constants: ``python -m fastl2r.kernels.compile_check`` compiles them all."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-m", "fastl2r.kernels.compile_check", "--arch", "90", "--groups", "1,4",
                          "--json"], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(r["kernel"] for r in report) == sorted(
        ["_channel_means_kernel"] + 2 * ["_prologue_kernel", "_forward_kernel", "_backward_rows_kernel",
                                         "_backward_weights_kernel", "_forward_kernel", "_backward_rows_kernel",
                                         "_backward_weights_kernel"])
    for r in report:
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= 227 * 1024, r
