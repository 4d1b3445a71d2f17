"""What the fused ops' tests share (test_channel_means.py, test_meta_lstm.py, test_gated_update.py,
test_backends.py): the backends and devices, the groups of meta-nets, random inputs, the float64
reference as the truth, and stand-ins that count Triton launches.

Backends: cpp (CPU), cuda (GPU), triton on the CPU (Triton's interpreter, which conftest.py
switches on where there is no GPU) and triton on CUDA (compiled).  The truth is the reference
evaluated in float64 on the same inputs, within the bound ``TOLERANCE`` states per op.  Every
output and scratch buffer is NaN-filled when allocated (``poisoned_outputs``), so an element a
kernel forgets to write fails.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastl2r.meta import MetaLearner
from fastl2r.models import resnet14_gn, resnet32_gn
from fastl2r.ops import GroupDims, unpack_head
from fastl2r.ops import BACKENDS

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
RESNET32_GROUPS = [g for g in RESNET_GROUPS if g.id.startswith("resnet32_gn")]
ODD_GROUPS = [
    pytest.param(GroupDims(K=5, Ar=1, Ds=7, H=8), (3, 1, 33), id="odd-conv"),
    pytest.param(GroupDims(K=1, Ar=2, Ds=0, H=4), (1,), id="one-row"),
    pytest.param(GroupDims(K=3, Ar=0, Ds=0, H=5), (70, 2), id="no-activations"),
    pytest.param(GroupDims(K=2, Ar=3, Ds=1, H=3), (40, 1, 17), id="odd-gn"),
]


def op_cases() -> list:
    """(backend, device, dtype, dims, rows) for every backend, dtype and group, but the network
    groups only in float32 on the interpreter (it runs each Triton program at Python speed); the
    backends of one input side by side, so that they share its reference outputs."""
    cases = []
    for group in RESNET_GROUPS + ODD_GROUPS:
        for dt in DTYPES:
            for bd in BACKEND_DEVICES:
                if bd is TRITON_CPU and dt.values[0] == F64 and group in RESNET_GROUPS:
                    continue
                cases.append(pytest.param(*bd.values, *dt.values, *group.values, marks=bd.marks,
                                          id=f"{bd.id}-{dt.id}-{group.id}"))
    return cases


# Episode slots (S = w's rows / sum(rows)): small groups, so that the interpreter stays quick.
SLOT_GROUPS = [
    pytest.param(GroupDims(K=5, Ar=1, Ds=7, H=6), (3, 1, 40), id="conv"),  # a slot of 40 rows: 2 CPU row blocks
    pytest.param(GroupDims(K=1, Ar=2, Ds=0, H=5), (4, 2, 7), id="gn"),
]
SLOTS = (1, 2, 3)


def slot_cases() -> list:
    """(backend, device, dtype, dims, rows, slots), the backends of one input side by side."""
    return [pytest.param(*bd.values, *dt.values, *group.values, slots, marks=bd.marks,
                         id=f"{bd.id}-{dt.id}-{group.id}-S{slots}")
            for group in SLOT_GROUPS for slots in SLOTS for dt in DTYPES for bd in BACKEND_DEVICES]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output and scratch buffer of the C++ and Triton ops NaN-filled when allocated."""
    monkeypatch.setenv("FASTL2R_POISON_OUTPUTS", "1")


def require(backend: str, device: str) -> None:
    """Skip, saying why, unless ``backend`` runs on ``device`` here."""
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


def gradients_of(outputs: dict, used, leaves: list, seed: int) -> tuple:
    """The gradients w.r.t. ``leaves`` of a random linear loss on the ``used`` outputs (zero where a
    leaf does not reach them); the other outputs' cotangents are absent, as when a loss ignores them."""
    gen = torch.Generator().manual_seed(seed)
    cotangents = {name: torch.randn(t.shape, generator=gen, dtype=F64).to(t) for name, t in outputs.items()}
    return torch.autograd.grad([outputs[n] for n in used], leaves, [cotangents[n] for n in used],
                               materialize_grads=True)


def as_float64(x: dict) -> dict:
    """The inputs of ``make_group`` in float64 on the CPU: the reference's, for the truth."""
    return {k: v.detach().double().cpu() if isinstance(v, torch.Tensor) else v for k, v in x.items()}


_last_reference: dict = {}


def reference_outputs(outputs, dims: GroupDims, rows, dtype: torch.dtype, slots: int, **options) -> list:
    """``outputs("reference", ·, **options)`` on the float64 copy of ``make_group(dims, rows, dtype,
    slots=slots)``, which does not depend on the device: computed once for the backends tested one
    after another."""
    key = (outputs.__name__, dims, tuple(rows), dtype, slots, tuple(sorted(options.items())))
    if key not in _last_reference:
        _last_reference.clear()
        _last_reference[key] = outputs("reference", as_float64(make_group(dims, rows, dtype, slots=slots)),
                                       **options)
    return _last_reference[key]



def check_against_reference(outputs, names: list[str], tol: float, backend: str, device: str, dtype: torch.dtype,
                            dims: GroupDims, rows, slots: int = 1, **options) -> None:
    """``outputs(backend, ·, **options)`` on ``make_group``'s inputs on ``device`` against the float64
    reference's, output by output (``names``), each in ``dtype`` on ``device``."""
    x = make_group(dims, rows, dtype, device, slots=slots)
    actual = outputs(backend, x, **options)
    expected = reference_outputs(outputs, dims, rows, dtype, slots, **options)
    for name, a, e in zip(names, actual, expected, strict=True):
        assert a.dtype == dtype and a.device.type == device
        assert_matches(a, e, name, tol)

# Groups for the Triton kernels at other block sizes than the interpreter's: shapes that are no
# multiple of any block, so that every last-block mask is exercised.
BLOCK_SIZE_GROUPS = [pytest.param(*g.values, 1, id=g.id) for g in ODD_GROUPS] + [
    pytest.param(GroupDims(K=37, Ar=1, Ds=70, H=64), (17, 40), 1, id="wide-conv"),
    pytest.param(GroupDims(K=37, Ar=1, Ds=5, H=12), (17, 3), 2, id="wide-conv-2-slots"),
    pytest.param(GroupDims(K=2, Ar=3, Ds=1, H=3), (40, 1, 17), 3, id="odd-gn-3-slots")]


class BackwardArguments(TorchDispatchMode):
    """Records the arguments of every call of a fused op's backward operator (``fastl2r::`` or
    ``fastl2r_triton::``), by op name: what its kernels were given."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list[tuple]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, name = func.name().split("::")
        if namespace.startswith("fastl2r") and name.endswith("_backward"):
            self.calls.setdefault(name, []).append(args)
        return func(*args, **(kwargs or {}))


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
    """Every output of ``at_each_thread_count`` the same, bit for bit, at every thread count."""
    for n, outputs in zip(THREAD_COUNTS[1:], results[1:]):
        for name, one, other in zip(names, results[0], outputs, strict=True):
            assert torch.equal(one, other), (f"{name} differs between {THREAD_COUNTS[0]} and {n} threads, by up to "
                                             f"{(one.double() - other.double()).abs().max().item():.3g}")


class LaunchCounter:
    """Stands in for a Triton kernel: records the keyword arguments of its launches (and runs them
    unless ``run`` is False)."""

    def __init__(self, kernel, run: bool = True):
        self.kernel, self.run, self.launches = kernel, run, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            if self.run:
                self.kernel[grid](*args, **kwargs)
        return launch


def count_triton_launches(monkeypatch, run: bool = True) -> dict[str, LaunchCounter]:
    """Every kernel of the Triton ops replaced by a LaunchCounter, by ``module.kernel`` name."""
    from fastl2r.kernels import channel_means, gated_update, meta_lstm

    counters = {}
    for module in (channel_means, gated_update, meta_lstm):
        op = module.__name__.rsplit(".", 1)[-1]
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            counters[f"{op}.{name}"] = LaunchCounter(getattr(module, name), run)
            monkeypatch.setattr(module, name, counters[f"{op}.{name}"])
    return counters


def launch_count(counters: dict[str, LaunchCounter]) -> int:
    """Launches of every counted kernel together."""
    return sum(len(c.launches) for c in counters.values())
