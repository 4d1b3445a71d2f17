"""The C++ backend end to end: `exp1 --suite fmnist --preset smoke` (pre-training, meta-training,
the meta-test of ``ours``, readouts) with FASTL2R_BACKEND=cpp gives the reference's results.

Both runs start from the same pre-trained checkpoint and seeds, so they differ only in
the rounding of the fused ops, which compounds through meta-training and the meta-test
but stays at the level of float32 rounding:

- θ after meta-training: its change from the initialisation, per meta-net tensor, within
  0.1% of the reference's change (measured: 1e-7 to 3e-6), plus 1e-7 for a tensor that
  does not move at float32 resolution.  The meta-gradient behind that change runs through
  every op forward and backward; that θ did change is checked too.
- Readouts (accuracy of a fresh linear probe on 200 test images) and the original head's
  accuracy: within 2.5 accuracy points, i.e. at most 5 of the 200 images classified
  differently.  That is the spread that rounding alone causes: two processes running
  the same backend on the longer `exp5` smoke run, with meta-training losses equal to
  six digits, gave readouts up to 2.5 points apart; this shorter run measured no
  difference at all.

Scaled down for CI (2 minutes at most): resnet8_gn pre-trained for 0.03 epochs, one run,
one meta-training episode of 3 inner steps, 6 meta-test steps.  The loss threshold is out
of reach, so that an episode never ends on a loss that sits at the threshold within rounding.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastl2r.meta.trainer import MetaTrainer
from fastl2r.ops import BACKENDS
from fastl2r.workspace import Workspace
from fastl2r.train import main

SMOKE = ["exp1", "--suite", "fmnist", "--preset", "smoke", "--methods", "ours", "--runs", "1",
         "--set", 'arch="resnet8_gn"', "--set", "metatrain.episodes=1", "--set", "metatrain.episode_steps=3",
         "--set", "metatrain.tbptt=[2,2,2]", "--set", "metatrain.threshold=[1000.0,5.0,1000.0]",
         "--set", "metatest.steps_per_task=6", "--set", "pretrain.epochs=0.03", "--no-progress", "--device", "cpu"]
THETA_RTOL, THETA_ATOL = 1e-3, 1e-7
ACCURACY_TOLERANCE = 0.025  # 5 of the 200 readout test images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run with each backend: {backend: (results.json, metatrain.json, θ - θ_init)}."""
    reason = BACKENDS["cpp"].unavailable("cpu")
    if reason is not None:
        pytest.skip(reason)
    data_root = tmp_path_factory.mktemp("data")  # the pre-trained checkpoint is cached here, shared
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        for backend in ("reference", "cpp"):
            monkeypatch.setenv("FASTL2R_BACKEND", backend)
            run_dir = tmp_path_factory.mktemp(backend)
            assert main(SMOKE + ["--data-root", str(data_root), "--out", str(run_dir)]) == 0
            config = json.loads((run_dir / "config.json").read_text())
            for key in ("methods_run", "device"):
                config.pop(key)
            initial = MetaTrainer(Workspace(config, data_root=data_root, progress=False)).meta.state_dict()
            trained = torch.load(run_dir / "metalearner.pt", map_location="cpu", weights_only=False)["meta"]
            out[backend] = (json.loads((run_dir / "results.json").read_text()),
                            json.loads((run_dir / "metatrain.json").read_text()),
                            {name: trained[name] - initial[name] for name in trained})
    return out


def test_metatraining_gives_the_reference_metalearner(runs):
    (_, progress, change), (_, expected_progress, expected_change) = runs["cpp"], runs["reference"]
    assert progress["inner_steps"] == expected_progress["inner_steps"] == 3
    assert progress["nonfinite"] == expected_progress["nonfinite"] == 0
    for episode, reference_episode in zip(progress["history"], expected_progress["history"], strict=True):
        assert episode["ended_by"] == reference_episode["ended_by"] == "horizon"
        for loss in ("final_loss", "mean_loss"):
            assert episode[loss] == pytest.approx(reference_episode[loss], rel=1e-4)
    assert change.keys() == expected_change.keys()
    assert max(d.abs().max().item() for d in expected_change.values()) > 1e-4  # θ was trained
    for name, expected in expected_change.items():
        error = (change[name] - expected).norm().item()
        assert error <= THETA_RTOL * expected.norm().item() + THETA_ATOL, (
            f"θ {name}: change {change[name].norm():.3e}, the reference's {expected.norm():.3e}, "
            f"difference {error:.3e}")


def test_metatest_readouts_match_the_reference(runs):
    (results, _, _), (expected, _, _) = runs["cpp"], runs["reference"]
    assert results["eval_steps"] == expected["eval_steps"] and len(results["eval_steps"]) >= 2
    compared = 0
    for kind in ("readout", "original"):
        for task, series in expected["methods"]["ours"][kind].items():
            actual = results["methods"]["ours"][kind][task]["mean"]
            for step, a, e in zip(results["eval_steps"], actual, series["mean"], strict=True):
                assert (a is None) == (e is None)
                if e is not None:
                    assert abs(a - e) <= ACCURACY_TOLERANCE, f"{kind} {task} step {step}: cpp {a:.3f}, reference {e:.3f}"
                    compared += 1
    assert compared >= 8
