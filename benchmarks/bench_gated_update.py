"""The gated update, forward + backward, for every meta-net group of resnet32_gn.

One timed call runs ``fastl2r.ops.gated_update`` once per group (5 groups, 93 meta-nets),
then the gradients of a loss on the new weights w.r.t. ``h3``, the head parameters and ``w``;
with S episode slots (``harness.SLOTS``) every call carries S copies of each group's rows.

Bytes model (the floor), per group: the forward reads ``h3 [R, H]``, ``head [G, K·H+K+1]``,
``w, g [R, K]`` and writes ``w', δ [R, K]``; the backward reads the cotangent of ``w'``,
``h3``, ``head`` and ``g`` and writes the gradients of ``h3`` and ``head`` (the gradient of
``w`` is the cotangent itself, no traffic).
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops

from .bench_meta_lstm import nbytes
from .harness import SLOTS, forced, measure, require, slotted, variant_params

ROUNDS = {"cpu": 3, "cuda": 100}


def gated_update_bytes(h3, head, w, g) -> int:
    forward = nbytes(h3, head, w, g) + 2 * nbytes(w)
    backward = nbytes(w) + nbytes(h3, head, g) + nbytes(h3, head)
    return forward + backward


@pytest.mark.parametrize("slots", SLOTS)
@pytest.mark.parametrize("device,variant", variant_params())
def test_gated_update_forward_backward(benchmark, resnet32_update, device, variant, slots):
    require(variant, device)
    x = resnet32_update(device)
    gen = torch.Generator().manual_seed(2)
    groups = []
    for group in x.meta.groups:
        i, rows = group.index, group.rows
        h3 = (torch.randn(slots * sum(rows), group.dims.H, generator=gen) * 0.5).to(device).requires_grad_()
        groups.append(dict(h3=h3, head=x.meta.head[i], w=slotted(x.weights[i], rows, slots).detach().requires_grad_(),
                           g=slotted(x.grads[i], rows, slots), rows=rows, lr=x.meta.lr))
    leaves = [t for a in groups for t in (a["h3"], a["head"], a["w"])]
    cotangents = [torch.randn_like(a["w"]) for a in groups]
    forward = forced(variant, lambda: [ops.gated_update(**a)[0] for a in groups])

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, cotangents)
    total = sum(gated_update_bytes(a["h3"], a["head"], a["w"], a["g"]) for a in groups)
    measure(benchmark, forward_backward, op="gated_update", variant=variant, device=device, rounds=ROUNDS,
            bytes_moved=total, slots=slots)
