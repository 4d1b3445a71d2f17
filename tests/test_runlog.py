"""Live logs (CSV as the run goes, TensorBoard), the overall progress line, and Ctrl-C."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from fastl2r import progress
from fastl2r.errors import UserError
from fastl2r.runlog import READOUT_COLUMNS, RunLog
from fastl2r.train import main

from test_extension import PLUGIN

EPISODE = {"episode": 4, "steps": 12, "final_loss": 3.5, "mean_loss": 4.25, "threshold": 25.0, "tbptt": 4,
           "ended_by": "horizon", "checkpoint": 0, "tasks_reached": 2}


def rows(path):
    with open(path, newline="") as stream:
        return list(csv.reader(stream))


def test_csv_lines_are_appended_with_one_header(tmp_path):
    log = RunLog(tmp_path)
    log.episode(EPISODE)
    log.episode({**EPISODE, "episode": 5})
    log.readout("ours", 0, 10, 0, "fashion_mnist[0,1]", 0.9, None)
    log.readout("sgd", 1, 20, 1, "fashion_mnist[7,9]", 0.5, 0.25)
    assert rows(tmp_path / "metatrain.csv") == [list(EPISODE), [str(v) for v in EPISODE.values()],
                                               [str(v) for v in {**EPISODE, "episode": 5}.values()]]
    assert rows(tmp_path / "readouts.csv") == [list(READOUT_COLUMNS),
                                              ["ours", "0", "10", "task1", "fashion_mnist[0,1]", "0.9", ""],
                                              ["sgd", "1", "20", "task2", "fashion_mnist[7,9]", "0.5", "0.25"]]
    RunLog(None).episode(EPISODE)  # no run folder, no files
    assert sorted(os.listdir(tmp_path)) == ["metatrain.csv", "readouts.csv"]


def test_tensorboard_gets_the_same_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, tensorboard=True)
    log.episode(EPISODE)
    log.readout("ours", 1, 20, 0, "x", 0.75, 0.5)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("metatrain/final_loss")] == [(4, 3.5)]
    assert [(e.step, e.value) for e in events.Scalars("readout/task1/ours/run1")] == [(20, 75.0)]
    assert [(e.step, e.value) for e in events.Scalars("original/task1/ours/run1")] == [(20, 50.0)]


def test_tensorboard_missing_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(UserError, match="pip install tensorboard"):
        RunLog(tmp_path, tensorboard=True)
    code = main(["exp1", "--suite", "fmnist", "--preset", "smoke", "--tensorboard", "--out", str(tmp_path / "run"),
                 "--data-root", str(tmp_path / "data"), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: --tensorboard needs the tensorboard package: pip install tensorboard"]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_overall_eta_from_each_methods_seconds_per_step(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    overall = progress.OverallProgress(["ours", "sgd"], runs=2, steps_per_run=10, enabled=False)
    overall.preparing("ours")
    clock.now = 100.0  # preparation: no estimate yet
    assert overall.eta() is None
    overall.begin_run("ours", 0)
    for _ in range(4):
        clock.now += 3.0
        overall.step()
    # ours so far 3 s/step: 6 steps of this run, then sgd (unseen: 3 s/step) twice and ours once more
    assert overall.eta() == pytest.approx(6 * 3 + 2 * 10 * 3 + 10 * 3)
    for _ in range(6):
        clock.now += 3.0
        overall.step()
    overall.end_run()
    overall.begin_run("sgd", 0)
    for _ in range(10):
        clock.now += 1.0
        overall.step()
    overall.end_run()
    assert overall.eta() == pytest.approx(10 * 3 + 10 * 1)
    overall.skip("ours")  # its run 1 was done before a resume, or by another rank
    assert overall.eta() == pytest.approx(10 * 1)
    overall.skip("sgd")
    overall.close()
    assert overall.doing == "done"


def subprocess_run(tmp_path, until, sig):
    """The blobs experiment in a child process, sent ``sig`` once ``until`` exists in its run folder."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "fastl2r.train", "exp1", "--plugin", str(PLUGIN), "--suite", "blobs", "--arch",
         "small_cnn", "--preset", "smoke", "--methods", "ours,sgd", "--set", "metatest.steps_per_task=2000",
         "--data-root", str(tmp_path / "data"), "--out", str(out), "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal gives it, however pytest started
    deadline = time.monotonic() + 240
    while not (out / until).exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    child.send_signal(sig)
    _, err = child.communicate(timeout=60)
    return child.returncode, err, out


@pytest.mark.slow
def test_ctrl_c_says_how_to_resume(tmp_path):
    code, err, out = subprocess_run(tmp_path, "readouts.csv", signal.SIGINT)
    assert code == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted; resume with: python -m fastl2r.train --resume {out}"


@pytest.mark.slow
def test_a_killed_run_leaves_whole_csv_lines(tmp_path):
    code, _, out = subprocess_run(tmp_path, "readouts.csv", signal.SIGKILL)
    assert code == -signal.SIGKILL
    for name, width in (("metatrain.csv", 9), ("readouts.csv", 7)):
        text = (out / name).read_text()
        assert text.endswith("\n")
        assert all(len(row) == width for row in rows(out / name)), name
