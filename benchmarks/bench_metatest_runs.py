"""One meta-test step of the 5 runs of ``exp1 --preset quick`` (resnet32_gn, batch 64, a 5-class
new task): the runs' learners one after another (``--parallel-runs 1``) against one step of
their slots side by side (``--parallel-runs 5``, ``run_slots``), for ``sgd`` and ``ours`` (a
fresh meta-learner: its δ costs what a trained one's does).  Random images: a step's work does
not depend on the data.  ``variant`` is the mode; the ratio is per run-step.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fastl2r.baselines.sgd import SGDLearner
from fastl2r.data import Batch
from fastl2r.meta import MetaLearner
from fastl2r.meta.ours import OursLearner, SlotOurs
from fastl2r.models import resnet32_gn
from fastl2r.run_slots import RunRNGs, SlotNetwork, SlotSGD, stack

from .harness import measure

RUNS, BATCH, CLASSES = 5, 64, 5
ROUNDS = {"cpu": 3, "cuda": 20}
WARMUP = {"cpu": 1, "cuda": 3}


def step_of_runs(method: str, mode: str, device: str):
    """A callable making one step of every run, in ``mode`` (``one_by_one`` or ``side_by_side``)."""
    torch.manual_seed(0)
    model = resnet32_gn(1, [5]).to(device)
    meta = MetaLearner(resnet32_gn(1)).to(device).requires_grad_(False) if method == "ours" else None
    models = [copy.deepcopy(model) for _ in range(RUNS)]
    learners = ([OursLearner(m, meta) for m in models] if meta is not None else None)
    for m in models:
        m.add_head(CLASSES)
    g = torch.Generator().manual_seed(1)
    batches = [Batch(torch.randn(BATCH, 1, 32, 32, generator=g).to(device),
                     torch.randint(0, CLASSES, (BATCH,), generator=g).to(device),
                     torch.zeros(BATCH, dtype=torch.int64, device=device)) for _ in range(RUNS)]
    if mode == "one_by_one":
        learners = learners or [SGDLearner(m, 0.1) for m in models]
        for learner in learners:
            learner.begin_task(1, None)

        def step():
            for learner, batch in zip(learners, batches):
                learner.step(batch, None)
        return step
    network = SlotNetwork(models)
    runs = list(range(RUNS))
    slotted = (SlotOurs(network, meta, runs, RunRNGs(dict.fromkeys(runs, 0), torch.device(device)), {}, 0)
               if meta is not None else SlotSGD(network, 0.1))
    slotted.begin_task(1)
    stacked = stack(batches)

    def step():
        slotted.step(stacked, None)
    return step


@pytest.mark.parametrize("method", ["sgd", "ours"])
@pytest.mark.parametrize("mode", ["one_by_one", "side_by_side"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_metatest_step_of_5_runs(benchmark, device, mode, method):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    measure(benchmark, step_of_runs(method, mode, device), op=f"meta-test step of {RUNS} runs, {method}, resnet32_gn",
            variant=mode, device=device, rounds=ROUNDS, warmup=WARMUP)
