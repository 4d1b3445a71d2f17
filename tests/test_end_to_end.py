"""Whole experiments on the offline suite with the smoke preset, through the CLI."""
import json

import pytest

from fastl2r.methods import METHODS
from fastl2r.train import main

CLASSES = {"exp1": (5, 5), "exp2": (4, 2), "exp3": (4, 2), "exp4": (4, 2), "exp5": (2, 2, 2)}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, data_root):
    """Each experiment run once per session, with every method (exp3: ours and sgd)."""
    done = {}

    def get(experiment):
        if experiment not in done:
            out = tmp_path_factory.mktemp(experiment)
            methods = "ours,sgd" if experiment == "exp3" else ",".join(METHODS)
            code = main([experiment, "--suite", "fmnist", "--preset", "smoke", "--methods", methods,
                         "--data-root", str(data_root), "--out", str(out), "--no-progress", "--device", "cpu"])
            assert code == 0
            done[experiment] = out
        return done[experiment]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["exp1", "exp2", "exp3", "exp4", "exp5"])
def test_smoke_run_is_complete(smoke, experiment):
    out = smoke(experiment)
    config = json.loads((out / "config.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert config["experiment"] == results["experiment"] == experiment
    assert results["suite"] == "fmnist" and results["preset"] == "smoke"
    steps = results["eval_steps"]
    per_task = config["metatest"]["steps_per_task"]
    assert steps[0] == 0 and steps[-1] == per_task * (len(CLASSES[experiment]) - 1)
    expected = ["ours", "sgd"] if experiment == "exp3" else list(METHODS)
    assert list(results["methods"]) == expected
    for name, entry in results["methods"].items():
        assert set(entry["readout"]) == set(entry["original"]) == {f"task{i + 1}" for i in range(len(CLASSES[experiment]))}
        for kind in ("readout", "original"):
            for task, series in entry[kind].items():
                assert len(series["mean"]) == len(series["std"]) == len(steps)
                start = 0 if task in ("task1", "task2") else per_task  # Task 3 starts after Task 2
                for step, mean, std in zip(steps, series["mean"], series["std"]):
                    if step < start:
                        assert mean is None and std is None
                    else:
                        assert 0.0 <= mean <= 1.0 and std >= 0.0, (name, kind, task, step)
        # the readout at each task's first step is well above chance
        for t, classes in enumerate(CLASSES[experiment]):
            first = next(m for m in entry["readout"][f"task{t + 1}"]["mean"] if m is not None)
            assert first > 1.5 / classes, (name, t, first)
    lines = (out / "curves.csv").read_text().splitlines()
    assert lines[0] == "method,kind,task,step,run,accuracy" and len(lines) > 1
    for figure in ("readout.png", "readout_vs_original_sgd.png"):
        assert (out / figure).stat().st_size > 10_000
    if "ours" in results["methods"]:
        assert results["methods"]["ours"]["info"]["metatrain"]["inner_steps"] > 0
        for figure in ("metatraining.png", "deltas.png", "readout_vs_original_ours.png"):
            assert (out / figure).stat().st_size > 10_000
        assert (out / "metalearner.pt").exists()


@pytest.mark.slow
def test_a_trained_metalearner_is_reused(smoke, data_root, tmp_path):
    trained = smoke("exp1") / "metalearner.pt"
    code = main(["exp1", "--suite", "fmnist", "--preset", "smoke", "--methods", "ours", "--runs", "1",
                 "--metalearner", str(trained), "--data-root", str(data_root), "--out", str(tmp_path),
                 "--no-progress", "--device", "cpu"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["methods"]["ours"]["info"] == {}  # loaded, not trained
    assert not (tmp_path / "metatraining.png").exists()
