"""The whole meta-learner update of resnet32_gn, forward + backward.

``MetaLearner.step`` over every group (93 meta-nets, θ ≈ 9.8 M parameters: activation
features, meta-LSTM, gated update), then the gradient w.r.t. θ of a loss on the new weights.
The compiled reference is ``torch.compile(MetaLearner.step)`` with the reference ops.
"""
from __future__ import annotations

import pytest

from .harness import forced, measure, require, update_forward_backward, variant_params

ROUNDS = {"cpu": 3, "cuda": 50}


@pytest.mark.parametrize("device,variant", variant_params())
def test_meta_update_forward_backward(benchmark, resnet32_update, device, variant):
    require(variant, device, unrolls_every_meta_net=True)
    x = resnet32_update(device)
    step = forced(variant, x.meta.step)
    cotangents = x.cotangents()
    measure(benchmark, lambda: update_forward_backward(x, cotangents, step), op="meta_update", variant=variant,
            device=device, rounds=ROUNDS)
