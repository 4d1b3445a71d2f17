"""Readouts of a meta-test evaluation: the linear layers of every task seen, fitted one by one
(``linear_readout`` per task, as before batching) or as one batched problem (``linear_readouts``).

Shapes: the quick and cpu presets' readout subsets (1000 training and 1000 test features of
width 64, 5 classes per task) with 2 tasks (Experiment 1) or 3 (Experiment 5), 500 Adam steps.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r.readout import ReadoutProblem, linear_readouts

from .harness import measure

ROUNDS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 1, "cuda": 2}


def problems(tasks: int, device: str) -> list[ReadoutProblem]:
    g = torch.Generator().manual_seed(0)
    out = []
    for t in range(tasks):
        x = torch.randn(2000, 64, generator=g).to(device)
        y = torch.randint(0, 5, (2000,), generator=g).to(device)
        out.append(ReadoutProblem(x[:1000], y[:1000], x[1000:], y[1000:], 5, seed=t))
    return out


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("variant", ["one-by-one", "batched"])
@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_readouts(benchmark, device, variant, tasks):
    given = problems(tasks, device)
    if variant == "batched":
        def fit():
            return linear_readouts(given)
    else:
        def fit():
            return [linear_readouts([p])[0] for p in given]
    measure(benchmark, fit, op=f"readouts of {tasks} tasks", variant=variant, device=device, rounds=ROUNDS,
            warmup=WARMUP)
