"""Bad input: one clear line on stderr, exit status 2, nothing half-written."""
import os
import subprocess
import sys

import pytest

from fastl2r.train import main


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty data root and a mirror where nothing listens: downloads fail at once."""
    monkeypatch.setenv("FASTL2R_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FASTL2R_MIRROR", "http://127.0.0.1:9")
    return tmp_path


def run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize("argv,message", [
    (["exp9"], "unknown experiment 'exp9'"),
    (["exp1", "--suite", "mnist"], "unknown suite 'mnist'"),
    (["exp1", "--preset", "fast"], "unknown preset 'fast'"),
    (["exp1", "--methods", "sgd,adam"], "unknown method 'adam'"),
    (["exp1", "--methods", ","], "--methods is empty"),
    (["exp1", "--runs", "0"], "runs must be a positive"),
    (["exp1", "--runs", "x"], "invalid int value"),
    (["exp1", "--seed", "-1"], "seed must be a non-negative"),
    (["exp1", "--set", "metatest.eval_every=-5"], "metatest.eval_every must be a positive"),
    (["exp1", "--set", "readout.lr=NaN"], "readout.lr must be a positive finite"),
    (["exp1", "--set", "readout.lr=Infinity"], "readout.lr must be a positive finite"),
    (["exp1", "--set", "pretrain.nothing=1"], "unknown key 'pretrain.nothing'; valid keys: "),
    (["exp1", "--set", "readout.steps=abc"], "expected a value like 500"),
    (["exp1", "--set", "arch=\"vgg\""], "unknown arch 'vgg'"),
    (["exp1", "--device", "tpu"], "unknown device 'tpu'"),
    ([], "the following arguments are required: experiment"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, offline, argv, message):
    code, err = run(capsys, *argv, "--out", str(offline / "out"))
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert not (offline / "out" / "results.json").exists()


def test_unwritable_output_folder(capsys, offline):
    blocker = offline / "file"
    blocker.write_text("not a folder")
    code, err = run(capsys, "exp1", "--suite", "fmnist", "--preset", "smoke", "--out", str(blocker / "run"))
    assert code == 2 and "cannot write to the output folder" in err[-1] and "--out" in err[-1]


def test_cuda_without_a_gpu(capsys, offline):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, err = run(capsys, "exp1", "--device", "cuda", "--out", str(offline / "out"))
    assert code == 2 and "--device cpu" in err[-1]


def test_missing_dataset_says_where_and_how(capsys, offline):
    code, err = run(capsys, "exp1", "--preset", "smoke", "--methods", "sgd", "--device", "cpu",
                    "--out", str(offline / "out"))
    assert code == 2
    message = err[-1]
    assert "cifar-10-python.tar.gz" in message and str(offline / "data") in message
    assert "--suite fmnist" in message and "FASTL2R_MIRROR" in message
    assert not (offline / "out" / "results.json").exists()
    assert not list((offline / "data").rglob("*.tmp")) if (offline / "data").exists() else True


def test_corrupt_archive_is_reported_and_not_used(capsys, offline):
    data = offline / "data"
    data.mkdir()
    (data / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not really a tarball")
    code, err = run(capsys, "exp1", "--preset", "smoke", "--methods", "sgd", "--device", "cpu",
                    "--out", str(offline / "out"))
    assert code == 2 and "cifar-10-python.tar.gz" in err[-1]
    assert sorted(p.name for p in data.iterdir()) == ["cifar-10-python.tar.gz"]  # nothing extracted or cached


def test_paper_preset_on_cpu_prints_an_estimate_first(capsys, offline):
    """Meta-training the paper's rule is hundreds of CPU hours, far past the one-hour line on any CPU (SGD
    alone is about two hours on a slow one and under one on a fast one, so it cannot be the test)."""
    code, err = run(capsys, "exp1", "--methods", "ours,sgd", "--device", "cpu", "--out", str(offline / "out"))
    assert code == 2  # CIFAR-10 is not here
    assert "roughly" in err[0] and "hours" in err[0]


def test_the_duration_estimate_counts_what_the_run_does():
    """Pre-training, meta-training only when ``ours`` meta-trains here, and the meta-test of the methods run
    (hand-counted for the cpu preset: w0 and 1 checkpoint of 40 epochs at ~200 batches; 47 episodes of 500
    steps, up to 4 + 9 passes each; 5 runs of 500 steps, 2 passes each)."""
    from fastl2r.experiments import build_config
    from fastl2r.train import network_passes

    config = build_config("exp1", "fmnist_inverted", "cpu")
    pretrain, metatrain, per_method = 2 * 200 * 40 * 2, 47 * 500 * 13, 5 * 500 * 2
    assert network_passes(config, ["sgd"]) == pretrain + per_method
    assert network_passes(config, ["ours", "sgd"]) == pretrain + metatrain + 2 * per_method
    config["methods"]["ours"]["metalearner"] = "metalearner.pt"
    assert network_passes(config, ["ours", "sgd"]) == pretrain + 2 * per_method


def test_the_module_entry_point_exits_2_without_a_traceback(offline):
    env = {**os.environ, "FASTL2R_DATA": str(offline / "data")}
    proc = subprocess.run([sys.executable, "-m", "fastl2r.train", "exp1", "--runs", "-3"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: runs must be a positive finite number, got -3"
    assert "Traceback" not in proc.stderr


def test_the_summary_says_how_meta_training_episodes_ended():
    from fastl2r.train import summary

    readout = {"task1": [[0.9, 0.8]], "task2": [[0.5, 0.7]]}
    info = {"metatrain": {"episodes": 5, "inner_steps": 1234, "nonfinite_episodes": 1,
                          "ended_by_threshold": {"20": {"threshold": 2, "horizon": 1, "nonfinite": 1},
                                                 "25": {"threshold": 1, "horizon": 0, "nonfinite": 0}}}}
    results = {"experiment": "exp1", "suite": "fmnist", "preset": "smoke", "seconds": 1.0, "eval_steps": [0, 10],
               "methods": {"ours": {"readout": {t: {"mean": r[0], "std": [0.0, 0.0]} for t, r in readout.items()},
                                    "info": info}}}
    text = summary(results)
    assert "meta-trained on 5 episodes (1,234 inner steps), 3 of them restarted at the loss threshold, " \
           "1 ended non-finite" in text
