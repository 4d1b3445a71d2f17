"""The grouped meta-LSTM, forward + backward, for every meta-net group of resnet32_gn.

One timed call runs ``fastl2r.ops.meta_lstm`` once per group (5 groups, 93 meta-nets), then
the gradients w.r.t. the meta-parameters, the weights and the incoming states.

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

from .harness import measure, forced, require, variant_params

ROUNDS = {"cpu": 3, "cuda": 100}


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def meta_lstm_bytes(w, g, a_row, a_shared, lstm, h, c) -> int:
    inputs = nbytes(w, g, a_row, a_shared, lstm, h, c)
    outputs = nbytes(h, c)                     # h', c' have the shapes of h, c
    forward = inputs + outputs
    backward = outputs + (inputs + outputs) + nbytes(w, lstm, h, c)
    return forward + backward


@pytest.mark.parametrize("device,variant", variant_params())
def test_meta_lstm_forward_backward(benchmark, resnet32_update, device, variant):
    require(variant, device, unrolls_every_meta_net=True)
    x = resnet32_update(device)
    groups = []
    for group in x.meta.groups:
        i = group.index
        a_row, a_shared = x.meta.features_of(x.means, group)
        groups.append(dict(w=x.weights[i].detach().requires_grad_(), g=x.grads[i], a_row=a_row, a_shared=a_shared,
                           lstm=x.meta.lstm[i], rows=group.rows, h=x.state.h[i].detach().requires_grad_(),
                           c=x.state.c[i].detach().requires_grad_()))
    leaves = [t for a in groups for t in (a["w"], a["lstm"], a["h"], a["c"])]
    cotangents = [torch.randn_like(h) for a in groups for h in (a["h"], a["c"])]
    forward = forced(variant, lambda: [out for a in groups for out in ops.meta_lstm(**a)])

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, cotangents)
    total = sum(meta_lstm_bytes(a["w"], a["g"], a["a_row"], a["a_shared"], a["lstm"], a["h"], a["c"])
                for a in groups)
    measure(benchmark, forward_backward, op="meta_lstm", variant=variant, device=device, rounds=ROUNDS,
            bytes_moved=total)
