"""One short meta-training episode of ``exp1 --suite fmnist --preset quick``, reference vs fused ops.

``MetaTrainer.run_window`` on the real data (Fashion-MNIST from the data root:
``$FASTL2R_DATA``, else ``~/.cache/fastl2r``, else Debian's package): a fresh episode started
on the slot, ``EPISODE_STEPS`` inner steps with their meta-updates, one T-BPTT window (the
curriculum's first length, 5), the episode's end read back.  The loss threshold is lifted so that every round runs every
step; ``w0`` gets one pre-training step (its quality does not change the work), cached in
the data root like any ``w0``.
"""
from __future__ import annotations

import pytest

from fastl2r import ops
from fastl2r.errors import UserError
from fastl2r.experiments import build_config
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.workspace import Workspace

from .harness import EAGER, FUSED, measure, require, variant_params

EPISODE_STEPS = 5
ROUNDS = {"cpu": 1, "cuda": 10}
WARMUP = {"cpu": 0, "cuda": 1}


def short_episode_trainer(device: str) -> MetaTrainer:
    config = build_config("exp1", suite="fmnist", preset="quick", overrides=[
        "pretrain.epochs=0", f"metatrain.episode_steps={EPISODE_STEPS}", "metatrain.threshold=[1e9, 0, 1e9]",
        "metatrain.parallel_episodes=1", "metatrain.episodes=1000000"])
    workspace = Workspace(config, device=device, progress=False, download=False)
    try:
        trainer = MetaTrainer(workspace)
        workspace.pretrained_model(0)
    except UserError as exc:
        pytest.skip(f"Fashion-MNIST is not in the data root: {exc}")
    return trainer


@pytest.mark.parametrize("device,variant", variant_params((EAGER, *FUSED)))
def test_short_episode(benchmark, device, variant):
    require(variant, device)
    trainer = short_episode_trainer(device)

    def episode():
        (record,) = trainer.run_window()
        if record.steps != EPISODE_STEPS:
            raise RuntimeError(f"the episode ended after {record.steps} steps ({record.ended_by})")
    with ops.use_backend(variant):
        measure(benchmark, episode, op="episode", variant=variant, device=device, rounds=ROUNDS, warmup=WARMUP)
