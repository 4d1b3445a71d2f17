"""Operator dispatches of the meta-learner update (DESIGN §5), counted without a GPU.

The fused path's count must not grow with the network's depth (one op call per group of
meta-nets, whatever the number of layers) nor with the episode slots an op call carries;
the reference, one meta-net (and slot) at a time, grows with both.  Dispatch counts do not
depend on tensor sizes, so tiny hidden sizes keep the reference quick without changing what
is counted (and so does one thread: the reference's thousands of tiny ops pay for every
OpenMP hand-off on a busy machine).
"""
from collections import Counter

import pytest
import torch

from benchmarks.dispatch_counts import ARCHS, DispatchCounter, count_inner_step, count_update, host_reads
from benchmarks.harness import skip_reason
from fastl2r import ops
from fastl2r.meta import MetaLearner, find_meta_tensors
from fastl2r.models import ARCHITECTURES
from fastl2r.ops import GroupDims

TINY = dict(conv_hidden=3, norm_hidden=2)
FUSED = [pytest.param("cpp", "cpu", id="cpp"),
         pytest.param("triton", "cuda", id="triton", marks=pytest.mark.cuda),
         pytest.param("cuda", "cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_counter_counts_each_operator_of_forward_and_backward():
    x = torch.ones(3, requires_grad=True)
    with DispatchCounter() as forward:
        y = (x.view(3, 1) * 2).sum()
    with DispatchCounter() as backward:
        torch.autograd.grad(y, x)
    assert forward.ops == {"aten.view": 1, "aten.mul": 1, "aten.sum": 1}
    assert forward.views == {"aten.view"}
    assert backward.total >= 2 and {"aten.mul", "aten.expand"} <= set(backward.ops)


@pytest.fixture(scope="module")
def reference_counts():
    return {arch: count_update(arch, "reference", **TINY).total for arch in ARCHS}


def test_reference_update_count_grows_with_depth(reference_counts):
    counts = [reference_counts[a] for a in ARCHS]
    nets = [len(find_meta_tensors(ARCHITECTURES[a]())[0]) for a in ARCHS]
    assert counts == sorted(set(counts)), counts
    # Mostly per meta-net: at least 50 dispatches (forward + backward) for each one added.
    assert all((c2 - c1) >= 50 * (n2 - n1) for c1, c2, n1, n2 in zip(counts, counts[1:], nets, nets[1:])), counts


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_update_count_is_constant_in_depth(backend, device, reference_counts):
    reason = skip_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    counts = {arch: count_update(arch, backend, device, **TINY) for arch in ARCHS}
    totals = {arch: c.total for arch, c in counts.items()}
    assert len(set(totals.values())) == 1, totals
    for arch, c in counts.items():  # one meta_lstm and one gated_update per group of meta-nets
        fused_calls = sum(n for name, n in c.forward.items() if name.startswith("fastl2r"))
        assert fused_calls == 2 * len(MetaLearner(ARCHITECTURES[arch](), **TINY).groups), (arch, c.forward)
    assert totals["resnet32_gn"] * 20 < reference_counts["resnet32_gn"], (totals, reference_counts)


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_update_backward_fills_no_zeros(backend, device):
    # The cotangents of δ and c' (unused by this loss) reach the backward ops as None, which their
    # kernels skip; the saved gates, tanh(z) or scales that the forward ops return for their
    # backward get none either.
    reason = skip_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    counts = count_update("resnet8_gn", backend, device, **TINY)
    fills = sum(n for name, n in counts.backward.items()
                if name in ("aten.zeros", "aten.zeros_like", "aten.new_zeros", "aten.fill_", "aten.zero_"))
    assert fills == 0, dict(counts.backward)


def count_group_ops(backend: str, device: str, slots: int) -> Counter:
    """Dispatches of one group's meta_lstm and gated_update for ``slots`` episode slots, forward
    and backward (gradients w.r.t. w and both meta-parameter matrices)."""
    dims, rows = GroupDims(K=3, Ar=1, Ds=2, H=4), (2, 5)
    R, G = slots * sum(rows), len(rows)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return (torch.randn(*shape, generator=gen) * 0.1).to(device)
    w, lstm, head = randn(R, dims.K), randn(G, dims.lstm_size), randn(G, dims.head_size)
    leaves = [t.requires_grad_() for t in (w, lstm, head)]
    with ops.use_backend(backend), DispatchCounter() as counter:
        h, c = ops.meta_lstm(w, randn(R, dims.K), randn(R, dims.Ar), randn(G * slots, dims.Ds), lstm, rows,
                             randn(3, R, dims.H), randn(3, R, dims.H))
        w_new, _ = ops.gated_update(h[2], head, w, randn(R, dims.K), rows, 0.1)
        torch.autograd.grad(w_new.sum() + c.sum(), leaves)
    return counter.ops


@pytest.mark.parametrize("backend,device", FUSED)
def test_fused_op_count_does_not_grow_with_episode_slots(backend, device):
    reason = skip_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    assert count_group_ops(backend, device, 1) == count_group_ops(backend, device, 4)
    # The reference runs one (tensor, slot) at a time: its count grows, so the counter sees slots.
    assert sum(count_group_ops("reference", device, 4).values()) > sum(count_group_ops("reference", device, 1).values())


def test_inner_step_dispatches_do_not_grow_with_episode_slots():
    """S slots run as one folded computation: an inner step with its meta-update dispatches the
    same operators for 4 slots as for 16 (for 1, a few more or fewer views and copies: folding a
    single slot is a view), and reads nothing back to the host."""
    reason = skip_reason("cpp", "cpu")
    if reason is not None:
        pytest.skip(reason)
    counts = {s: count_inner_step("resnet8_gn", "cpp", "cpu", 1, s, **TINY) for s in (1, 4, 16)}
    assert counts[4].ops == counts[16].ops
    assert abs(counts[1].total - counts[16].total) <= 0.01 * counts[16].total, {s: c.total for s, c in counts.items()}
    assert all(host_reads(c) == 0 for c in counts.values())
