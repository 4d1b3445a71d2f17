"""The grouped meta-LSTM, forward + backward, for every meta-net group of resnet32_gn.

One timed call runs ``fastl2r.ops.meta_lstm`` once per group (5 groups, 93 meta-nets), then
the gradients w.r.t. the meta-parameters, the weights and the incoming states; with S
episode slots (``harness.SLOTS``) every call carries S copies of each group's rows.

Bytes model (the floor), per group: the forward reads ``w, g [R, K]``, ``a_row [R, Ar]``,
``a_shared [G, Ds]``, ``lstm [G, P]``, ``h, c [3, R, H]`` and writes ``h', c' [3, R, H]``;
the backward reads the cotangents of ``h', c'``, every forward input and output again, and
writes the gradients of ``w``, ``lstm``, ``h`` and ``c``.  Intermediates a backend saves
(gates) are not counted, so the achieved bandwidth is a lower bound of the real traffic.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops

from .harness import COMPILED, SLOTS, forced, measure, require, slotted, variant_params

ROUNDS = {"cpu": 3, "cuda": 100}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def meta_lstm_bytes(w, g, a_row, a_shared, lstm, h, c) -> int:
    inputs = nbytes(w, g, a_row, a_shared, lstm, h, c)
    outputs = nbytes(h, c)                     # h', c' have the shapes of h, c
    forward = inputs + outputs
    backward = outputs + (inputs + outputs) + nbytes(w, lstm, h, c)
    return forward + backward


@pytest.mark.parametrize("slots", SLOTS)
@pytest.mark.parametrize("device,variant", variant_params())
def test_meta_lstm_forward_backward(benchmark, resnet32_update, device, variant, slots):
    require(variant, device, unrolls_every_meta_net=True)
    if variant == COMPILED and slots > 1:
        pytest.skip("torch.compile of the reference unrolls every (meta-net, slot): the S = 1 graph is the baseline")
    x = resnet32_update(device)
    groups = []
    for group in x.meta.groups:
        i, rows = group.index, group.rows
        a_row, a_shared = x.meta.features_of(x.means, group)
        groups.append(dict(w=slotted(x.weights[i], rows, slots).detach().requires_grad_(),
                           g=slotted(x.grads[i], rows, slots), a_row=slotted(a_row, rows, slots),
                           a_shared=a_shared.repeat_interleave(slots, dim=0), lstm=x.meta.lstm[i], rows=rows,
                           h=slotted(x.state.h[i], rows, slots, dim=1).detach().requires_grad_(),
                           c=slotted(x.state.c[i], rows, slots, dim=1).detach().requires_grad_()))
    leaves = [t for a in groups for t in (a["w"], a["lstm"], a["h"], a["c"])]
    cotangents = [torch.randn_like(h) for a in groups for h in (a["h"], a["c"])]
    forward = forced(variant, lambda: [out for a in groups for out in ops.meta_lstm(**a)])

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, cotangents)
    total = sum(meta_lstm_bytes(a["w"], a["g"], a["a_row"], a["a_shared"], a["lstm"], a["h"], a["c"])
                for a in groups)
    measure(benchmark, forward_backward, op="meta_lstm", variant=variant, device=device, rounds=ROUNDS,
            bytes_moved=total, slots=slots)
