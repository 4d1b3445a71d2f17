"""The fused ops together, through their backends: what no single op's test file covers.

torch.compile through whole MetaLearner steps (fullgraph), the Triton ops' registration as
``triton_op`` (traced into their kernels), launches that do not grow with depth, a T-BPTT window
of chained MetaLearner steps against the reference, the backend choice, the kernels' place below
``fastl2r.ops``, and compilation of every Triton kernel for sm_90 (which needs no GPU).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from fastl2r import ops
from fastl2r.meta import MetaLearner
from fastl2r.models import resnet8_gn, resnet14_gn, resnet32_gn
from fastl2r.ops import GroupDims, reference
from ops_testing import (BACKEND_DEVICES, COMPILED_BACKEND_DEVICES, F64, LR, TOLERANCE, assert_matches,
                         count_triton_launches, launch_count, make_group, poisoned_outputs, require)  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("device,network", [
    pytest.param("cpu", "tiny", id="cpu-interpreter-aot_eager"),
    pytest.param("cuda", "resnet32_gn", id="cuda-inductor", marks=pytest.mark.cuda)])
def test_torch_compile_fullgraph_metalearner_step_triton(device, network):
    """``torch.compile(fullgraph=True)`` traces a whole MetaLearner step through the Triton ops,
    from a cold backend cache (the registry resolves the backend while tracing), and
    computes what eager mode does, forward and backward.  On a GPU the ops are triton_ops, so
    Inductor compiles their kernels into the graph; in the interpreter they are opaque custom ops."""
    require("triton", device)
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
    ops._cache.clear()
    results = []
    for fn in (compiled, step):
        leaves = [w.clone().requires_grad_() for w in weights]
        with ops.use_backend("triton"):
            loss = fn(leaves, grads, means, state.h, state.c)
        results.append([loss, *torch.autograd.grad(loss, list(meta.parameters()) + leaves)])
    for actual, expected in zip(*results):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


# Runs without Triton's interpreter (compiled kernels, as on a GPU), so that the Triton ops are
# triton_ops; AOT autograd traces one step, forward and backward, on CPU tensors and stops before
# anything runs.  Inductor reads which arguments a kernel writes from its Triton IR, which needs a
# target: Triton's driver is given sm_90's, as tools/compile_check.py compiles for it.
TRACE_TRITON_OPS = textwrap.dedent("""
    import json
    import torch
    import triton
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from triton.backends.compiler import GPUTarget

    class Sm90:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    from fastl2r import kernels
    from fastl2r.kernels import gated_update, meta_lstm
    from fastl2r.ops import GroupDims

    dims, rows = GroupDims(K=5, Ar=1, Ds=7, H=8), [3, 1, 33]
    R, G = sum(rows), len(rows)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(*shape, generator=gen) for shape in [
        (R, dims.K), (G, dims.lstm_size), (G, dims.head_size), (R, dims.K), (R, dims.Ar), (G, dims.Ds),
        (3, R, dims.H), (3, R, dims.H)]]
    for x in inputs[:3]:
        x.requires_grad_()

    def step(w, lstm, head, g, a_row, a_shared, h, c):
        h_new, c_new, _, _ = meta_lstm.meta_lstm(w, g, a_row, a_shared, lstm, rows, h, c)
        w_new, delta = gated_update.gated_update(h_new[2], head, w, g, rows, 0.1)
        return (w_new ** 2).sum() + h_new.sum()  # c_new and delta unused

    graphs = {}
    def partition(joint, joint_inputs, **kwargs):
        forward, backward = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
        for name, graph in (("forward", forward), ("backward", backward)):
            graphs[name] = [(str(n.target), {k: v for k, v in n.kwargs.get("kwargs", {}).items()
                                             if k.startswith("HAS_")}) for n in graph.graph.nodes
                            if n.op == "call_function" and ("triton" in str(n.target) or "fastl2r" in str(n.target))]
        return forward, backward

    def stop(graph, example_inputs):
        raise RuntimeError("traced")

    try:
        aot_function(step, fw_compiler=stop, bw_compiler=stop, partition_fn=partition)(*inputs)
    except RuntimeError as exc:
        assert str(exc) == "traced", exc
    from torch._subclasses.fake_tensor import is_fake
    print(json.dumps({"graphs": graphs, "fake_tables": sum(map(is_fake, kernels._tables.values()))}))
""")


def test_triton_ops_are_traced_into_their_kernels():
    """Compiled (not interpreted), the meta-LSTM and gated-update ops are ``torch.library.triton_op``s:
    a trace holds their kernel launches, not an opaque op (meta-LSTM forward 2 + gated update 1;
    backward 2 + 2), the absent cotangents (δ, c') reach the backward kernels as absent, and no
    table built while tracing is kept for real calls."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", TRACE_TRITON_OPS], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    wrapper = "triton_kernel_wrapper_functional"
    assert [target.rsplit(".", 1)[-1] for target, _ in out["graphs"]["forward"]] == [wrapper] * 3
    backward = out["graphs"]["backward"]
    assert [target.rsplit(".", 1)[-1] for target, _ in backward] == [wrapper] * 4
    flags = [f for _, f in backward if f]
    assert sorted(map(json.dumps, flags)) == sorted(map(json.dumps, [
        {"HAS_DW": True, "HAS_DDELTA": False}, {"HAS_DH": True, "HAS_DC": False}]))
    assert out["fake_tables"] == 0


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
        before = launch_count(counters)
        with ops.use_backend("triton"):
            loss = metalearner_step_loss(meta, weights, [torch.zeros_like(w) for w in weights],
                                         torch.zeros(meta.channel_count), state.h, state.c)
            torch.autograd.grad(loss, list(meta.parameters()) + weights)
        launches.append(launch_count(counters) - before)
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
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("FASTL2R_BACKEND", raising=False)
    assert ops.backend_name("cuda") == "triton"


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
    assert ops.backend_name("cpu") == "triton" and launch_count(counters) == 1


# ----- layering -----
def fastl2r_imports(path: Path) -> set[str]:
    """The fastl2r modules a source file imports (relative imports inside its package excluded)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "fastl2r")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "fastl2r":
            names.add(node.module)
    return names


def test_kernels_sit_below_the_ops():
    """The Triton kernels import nothing from fastl2r but the shared constants (``fastl2r.ops.layout``:
    the layout, the RMS epsilon), which imports nothing from fastl2r; the compile and spill check,
    a developer tool, is not in the installed package."""
    kernels = REPO / "kernels"
    if not kernels.is_dir():
        pytest.skip("needs the source tree (kernels/)")
    for path in sorted(kernels.glob("*.py")):
        assert fastl2r_imports(path) <= {"fastl2r.ops.layout"}, path.name
    assert fastl2r_imports(REPO / "fastl2r" / "ops" / "layout.py") == set()
    assert not (kernels / "compile_check.py").exists() and (REPO / "tools" / "compile_check.py").is_file()


# ----- compilation for a GPU this machine may not have -----
def test_triton_kernels_compile_for_sm90_within_resources():
    """Every kernel, as the launchers specialise it (float32, GPU block sizes) for resnet32_gn's
    GroupNorm group and its widest conv group (K = 576, D = 1217), compiles for sm_90 (H100);
    none spills and none needs more shared memory than an H100 block has (227 KiB).  The other
    groups only change constants: ``python tools/compile_check.py`` compiles them all."""
    tool = REPO / "tools" / "compile_check.py"
    if not tool.is_file():
        pytest.skip("needs the source tree (tools/compile_check.py)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, str(tool), "--arch", "90", "--groups", "1,4", "--json"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(r["kernel"] for r in report) == sorted(
        ["_channel_means_kernel"] + 2 * ["_prologue_kernel", "_forward_kernel", "_backward_rows_kernel",
                                         "_backward_weights_kernel", "_forward_kernel", "_backward_rows_kernel",
                                         "_backward_weights_kernel"])
    for r in report:
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["shared"] <= 227 * 1024, r
