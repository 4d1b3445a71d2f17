"""The C++ (CPU) and CUDA backends against the plain-PyTorch reference.

Every op, forward and backward, float32 and float64, at the exact shapes of every
meta-net group of resnet32_gn and resnet14_gn and at random odd shapes; the truth is
the reference evaluated in float64 on the same inputs.  Every output and scratch
buffer of the compiled ops is NaN-filled when allocated (FASTL2R_POISON_OUTPUTS), so
an element a kernel forgets to write fails.  Then gradcheck, opcheck, torch.compile,
thread-count invariance and a T-BPTT window of chained MetaLearner steps.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops
from fastl2r.meta import MetaLearner
from fastl2r.models import resnet14_gn, resnet32_gn
from fastl2r.ops import GroupDims, reference, unpack_head
from fastl2r.ops.registry import BACKENDS

LR = 0.1
BACKEND_DEVICES = [pytest.param("cpp", "cpu", id="cpp"),
                   pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda)]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


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


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setenv("FASTL2R_POISON_OUTPUTS", "1")


def require(backend: str, device: str) -> None:
    reason = BACKENDS[backend].unavailable(device)
    if reason is not None:
        pytest.skip(reason)


def make_group(dims: GroupDims, rows, dtype=torch.float64, device="cpu", seed=0) -> dict:
    """Random inputs of one group at realistic scales (a trained-looking head, live state)."""
    gen = torch.Generator().manual_seed(seed)
    R, G = sum(rows), len(rows)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    bound = dims.H ** -0.5
    head = randn(G, dims.head_size, scale=0.3)
    _, b_out, scale = unpack_head(head, GroupDims(dims.K, 0, 0, dims.H))
    b_out.add_(1.0)
    scale.fill_(1.3)
    return dict(w=randn(R, dims.K, scale=0.1), g=randn(R, dims.K, scale=0.01), a_row=randn(R, dims.Ar),
                a_shared=randn(G, dims.Ds), lstm=randn(G, dims.lstm_size, scale=bound),
                h=randn(3, R, dims.H, scale=0.5), c=randn(3, R, dims.H, scale=0.5),
                h3=randn(R, dims.H, scale=0.5), head=head, rows=tuple(rows))


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """``actual`` (in its dtype) against the float64 truth, relative to the truth's scale."""
    tol = 2e-4 if actual.dtype == torch.float32 else 1e-10
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
    cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (h_new, c_new)]
    grads = torch.autograd.grad((h_new, c_new), list(leaves.values()), cotangents)
    return [h_new, c_new, *grads]


def gated_update_outputs(backend: str, x: dict):
    """(w_new, δ) and the gradients w.r.t. h3, head, w of a random linear loss."""
    leaves = {k: x[k].detach().clone().requires_grad_() for k in ("h3", "head", "w")}
    with ops.use_backend(backend):
        w_new, delta = ops.gated_update(leaves["h3"], leaves["head"], leaves["w"], x["g"], x["rows"], LR)
    gen = torch.Generator().manual_seed(2)
    cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t) for t in (w_new, delta)]
    grads = torch.autograd.grad((w_new, delta), list(leaves.values()), cotangents)
    return [w_new, delta, *grads]


def as_float64(x: dict) -> dict:
    return {k: v.detach().double().cpu() if isinstance(v, torch.Tensor) else v for k, v in x.items()}


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,rows", RESNET_GROUPS + ODD_GROUPS)
def test_meta_lstm_matches_reference(backend, device, dtype, dims, rows):
    require(backend, device)
    x = make_group(dims, rows, dtype, device)
    actual = meta_lstm_outputs(backend, x)
    expected = meta_lstm_outputs("reference", as_float64(x))
    for name, a, e in zip(["h_new", "c_new", "grad_w", "grad_lstm", "grad_h", "grad_c"], actual, expected):
        assert a.dtype == dtype and a.device.type == device
        assert_matches(a, e, name)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,rows", RESNET_GROUPS + ODD_GROUPS)
def test_gated_update_matches_reference(backend, device, dtype, dims, rows):
    require(backend, device)
    x = make_group(dims, rows, dtype, device)
    actual = gated_update_outputs(backend, x)
    expected = gated_update_outputs("reference", as_float64(x))
    for name, a, e in zip(["w_new", "delta", "grad_h3", "grad_head", "grad_w"], actual, expected):
        assert a.dtype == dtype and a.device.type == device
        assert_matches(a, e, name)


def _activations(dtype, device, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3, 32, 32), (4, 16, 32, 32), (4, 16, 16, 16), (4, 64, 8, 8), (4, 64), (1, 5, 3, 1), (3, 2, 7)]
    xs = [(torch.randn(s, generator=gen, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device) for s in shapes]
    # A layer's output is the next layer's input: the same tensor listed twice.
    return xs + [xs[1], xs[1].transpose(2, 3), xs[0][:, 1:]]


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_means_matches_reference(backend, device, dtype):
    require(backend, device)
    xs = _activations(dtype, device)
    with ops.use_backend(backend):
        actual = ops.channel_means(xs)
    expected = reference.channel_means([x.double().cpu() for x in xs])
    assert actual.dtype == dtype and actual.device.type == device
    assert_matches(actual, expected, "means")


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_gradcheck_float64(backend, device):
    require(backend, device)
    x = make_group(GroupDims(K=2, Ar=1, Ds=2, H=3), (2, 3), torch.float64, device)
    rows = x["rows"]
    with ops.use_backend(backend):
        # w's gradient treats the RMS of its block as a constant (the contract), which
        # finite differences do not: it is checked against the reference above.
        assert torch.autograd.gradcheck(
            lambda lstm, h, c: ops.meta_lstm(x["w"], x["g"], x["a_row"], x["a_shared"], lstm, rows, h, c),
            (x["lstm"].requires_grad_(), x["h"].requires_grad_(), x["c"].requires_grad_()))
        assert torch.autograd.gradcheck(
            lambda h3, head, w: ops.gated_update(h3, head, w, x["g"], rows, LR),
            (x["h3"].requires_grad_(), x["head"].requires_grad_(), x["w"].requires_grad_()))


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(backend, device, dtype):
    require(backend, device)
    fl = torch.ops.fastl2r
    x = make_group(GroupDims(K=3, Ar=1, Ds=2, H=4), (2, 5), dtype, device)
    rows = list(x["rows"])
    lstm_args = [x["w"], x["g"], x["a_row"], x["a_shared"], x["lstm"], rows, x["h"], x["c"]]
    head_args = [x["h3"], x["head"], x["w"], x["g"], rows, LR]
    h_new, c_new, gates = fl.meta_lstm(*lstm_args)
    _, _, tanh_z = fl.gated_update(*head_args)
    torch.library.opcheck(fl.channel_means.default, ([x["h"], x["c"].transpose(0, 1)],))
    grad = [t.clone().requires_grad_() for t in lstm_args[:5]] + [rows] + [x["h"].clone().requires_grad_(),
                                                                          x["c"].clone().requires_grad_()]
    torch.library.opcheck(fl.meta_lstm.default, tuple(grad))
    torch.library.opcheck(fl.meta_lstm_backward.default,
                          (h_new, c_new, *lstm_args[:5], rows, x["h"], x["c"], h_new, c_new, gates))
    torch.library.opcheck(fl.gated_update.default,
                          (x["h3"].clone().requires_grad_(), x["head"].clone().requires_grad_(),
                           x["w"].clone().requires_grad_(), x["g"], rows, LR))
    torch.library.opcheck(fl.gated_update_backward.default,
                          (x["w"], x["g"], x["h3"], x["head"], x["g"], rows, LR, tanh_z))


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


def test_thread_count_does_not_change_results():
    require("cpp", "cpu")
    group = MetaLearner(resnet32_gn(3, [5])).groups[4]
    x = make_group(group.dims, group.rows, torch.float32)
    xs = _activations(torch.float32, "cpu")
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with ops.use_backend("cpp"):
                means = ops.channel_means(xs)
            results.append([means, *meta_lstm_outputs("cpp", x), *gated_update_outputs("cpp", x)])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKEND_DEVICES)
def test_tbptt_window_of_metalearner_steps(backend, device):
    """Three chained MetaLearner steps (weights and state of step t+1 are outputs of step
    t), then the meta-gradient of a loss on the last weights w.r.t. every θ."""
    require(backend, device)
    torch.manual_seed(0)
    model = resnet14_gn(1, [2]).double().to(device)
    grads_by_backend = []
    for name in (backend, "reference"):
        torch.manual_seed(1)
        meta = MetaLearner(model).double().to(device)
        for p in meta.head:
            p.data.add_(torch.randn_like(p) * 0.05)
        weights = [f.detach() for f in meta.flatten(dict(model.named_parameters()))]
        state = meta.initial_state(device, torch.float64)
        gen = torch.Generator().manual_seed(2)
        with ops.use_backend(name):
            for _ in range(3):
                grads = [(torch.randn(w.shape, generator=gen, dtype=torch.float64) * 0.01).to(device)
                         for w in weights]
                means = torch.randn(meta.channel_count, generator=gen, dtype=torch.float64).to(device)
                weights, state, _ = meta.step(weights, grads, means, state)
        loss = sum((w ** 2).sum() for w in weights) + sum(h.sum() for h in state.h)
        grads_by_backend.append(torch.autograd.grad(loss, list(meta.parameters())))
    for actual, expected in zip(*grads_by_backend):
        assert_matches(actual, expected, "meta-gradient")
