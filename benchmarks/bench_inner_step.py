"""Algorithm 1's full inner step at Experiment 1's shapes, reference vs fused ops.

The timed call is the last step of a T-BPTT window of 9 (the curriculum's cap in
Experiment 1): teacher SGD step on 128 images, student gradient on 64, the learned update of
every tensor, the meta-loss, and the trainer's meta-update — the backward through all 9
steps of the window and an Adam step on θ.  The 8 earlier steps of the window run untimed
before every round.
"""
from __future__ import annotations

import pytest

from fastl2r import ops

from .harness import EAGER, FUSED, InnerStepRig, measure, require, variant_params

WINDOW = 9
ROUNDS = {"cpu": 2, "cuda": 20}
WARMUP = {"cpu": 0, "cuda": 3}


@pytest.mark.parametrize("device,variant", variant_params((EAGER, *FUSED)))
def test_inner_step(benchmark, device, variant):
    require(variant, device)
    rig = InnerStepRig("resnet32_gn", device)
    with ops.use_backend(variant):
        measure(benchmark, rig.step, op="inner_step", variant=variant, device=device,
                rounds=ROUNDS, warmup=WARMUP, setup=lambda: rig.new_window(WINDOW))
