"""One run, one folder, one owner; faults are loud; bad input is one line; a kill loses nothing.

Every run here is a tiny exp1 of the offline suite (ResNet-8-GN, 4 meta-training episodes of 3
steps, 2 meta-test runs of 2×4 steps) so that whole runs, kills and resumes take seconds.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fastl2r import metatest, run_folder
from fastl2r.data import load_dataset
from fastl2r.errors import UserError
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner, save_metalearner
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.metatest import PROGRESS
from fastl2r.models import ARCHITECTURES
from fastl2r.train import main
from fastl2r.workspace import Workspace

TINY = ["arch=\"resnet8_gn\"", "pretrain.epochs=0.02", "metatrain.episodes=4", "metatrain.episode_steps=3",
        "metatrain.batch_size=8", "metatrain.save_every=1", "metatest.steps_per_task=4", "metatest.eval_every=2",
        "readout.steps=10", "readout.max_train=64", "readout.max_test=64"]
RUN = ["exp1", "--suite", "fmnist", "--preset", "smoke", "--methods", "ours,sgd", "--runs", "2", "--no-progress",
       "--device", "cpu"] + [a for item in TINY for a in ("--set", item)]
KILL_AT = Path(__file__).parent / "kill_at.py"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def env(data_root, monkeypatch):
    """The run's data root, and no network: a download fails at once."""
    monkeypatch.setenv("FASTL2R_DATA", str(data_root))
    monkeypatch.setenv("FASTL2R_MIRROR", "http://127.0.0.1:9")
    monkeypatch.delenv("FASTL2R_BACKEND", raising=False)


@pytest.fixture
def one_thread():
    """In-process runs compute with one CPU thread, as the subprocess reference does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cli(*argv, threads=1, point=None, n=0, action="kill", wait=True):
    """``python -m fastl2r.train ARGV`` in a subprocess with ``threads`` CPU threads by default;
    with ``point``, stopped at its ``n``-th arrival there (tests/kill_at.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "FASTL2R_MIRROR": "http://127.0.0.1:9"}
    env.pop("FASTL2R_BACKEND", None)
    command = ([sys.executable, str(KILL_AT), point, str(n), action, "--"] if point else
               [sys.executable, "-m", "fastl2r.train"]) + [str(a) for a in argv]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    proc.stdout_text, proc.stderr_text = proc.communicate(timeout=600)
    return proc


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The tiny run, uninterrupted, with one CPU thread."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = cli("--out", out, "--data-root", data_root, *RUN)
    assert proc.returncode == 0, proc.stderr_text
    return out


def outcome(run: Path) -> dict:
    """What a run computed, its timings aside: θ, the meta-training history, results and curves."""
    results = json.loads((run / "results.json").read_text())
    results.pop("seconds")
    for timing in ("seconds", "inner_steps_per_second"):
        results["methods"]["ours"]["info"]["metatrain"].pop(timing)
    history = json.loads((run / "metatrain.json").read_text())["history"]
    theta = torch.load(run / "metalearner.pt", weights_only=True)["meta"]
    return {"results": results, "history": history, "curves": (run / "curves.csv").read_text(),
            "theta": {k: v.numpy().tobytes() for k, v in theta.items()}}


def leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp") or p.name == run_folder.LOCK)


# ----- kill -9 anywhere, then --resume -----
KILLS = [("metatrain-window", 3),             # meta-training: 2 of 4 episodes checkpointed
         ("metatrain-checkpoint-write", 2),   # a checkpoint half-written
         ("metatest-run", 2),                 # meta-test: (ours, run 1) done, (sgd, run 1) under way
         ("metatest-progress-write", 2),      # the meta-test's progress half-written
         ("figure-write", 4)]                 # results.json written, a figure half-written


@pytest.mark.slow
def test_kill_9_at_any_point_then_resume_is_exact_whatever_the_thread_count(reference, data_root, tmp_path):
    """One run killed at each point in turn, each time resumed by a process whose default thread
    count differs (2, not the run's 1): θ, history, results and curves equal the uninterrupted
    run's bit for bit, and nothing half-written or locked is left."""
    run = tmp_path / "run"
    for i, (point, n) in enumerate(KILLS):
        argv = ["--out", run, *RUN] if i == 0 else ["--resume", run, *RUN]
        proc = cli(*argv, "--data-root", data_root, threads=1 if i == 0 else 2, point=point, n=n)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr_text[-3000:])
        assert run_folder.LOCK in leftovers(run)
        if point.endswith("write"):
            assert any(name.endswith(".tmp") for name in leftovers(run)), point
    proc = cli("--resume", run, "--data-root", data_root, "--no-progress", threads=2)
    assert proc.returncode == 0, proc.stderr_text
    assert leftovers(run) == []
    assert json.loads((run / "config.json").read_text())["threads"] == 1
    mine, truth = outcome(run), outcome(reference)
    for key in truth:
        assert mine[key] == truth[key], key


def test_a_resumed_meta_test_runs_only_the_unfinished_runs(reference, tmp_path, env, one_thread, capsys, monkeypatch):
    """A meta-test killed with run 2 of both methods unfinished: the resume runs those two, no more."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    progress = torch.load(run / PROGRESS, weights_only=True)
    for method in ("ours", "sgd"):
        del progress["curves"][method][1]
    torch.save(progress, run / PROGRESS)
    (run / "results.json").unlink()
    calls, real = [], metatest.run_method

    def recorded(ws, method, index, tasks, *progress):
        calls.append((method.name, index))
        return real(ws, method, index, tasks, *progress)

    monkeypatch.setattr(metatest, "run_method", recorded)
    code, err = run_main(capsys, "--resume", run)
    assert code == 0, err
    assert calls == [("ours", 1), ("sgd", 1)]
    assert outcome(run) == outcome(reference)


# ----- concurrent writers and locks -----
@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_first_finishes(reference, data_root, tmp_path, capsys, env):
    run, holding = tmp_path / "run", tmp_path / "holding"
    writer = cli("--out", run, "--data-root", data_root, *RUN, point="metatest-run", n=1, action=holding, wait=False)
    try:
        deadline = time.monotonic() + 300
        while not holding.exists():
            assert writer.poll() is None, writer.communicate()[1]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        before = snapshot(run)
        for argv, message in ((["--out", str(run), *RUN], "already holds files"),
                              (["--resume", str(run)], f"in use: process {writer.pid} is writing into it")):
            code, err = run_main(capsys, *argv)
            assert code == 2 and len(err) == 1 and message in err[0], err
        assert snapshot(run) == before
    finally:
        holding.unlink(missing_ok=True)
        _, stderr = writer.communicate(timeout=600)
    assert writer.returncode == 0, stderr
    assert outcome(run) == outcome(reference) and leftovers(run) == []


def test_a_lock_of_a_dead_process_is_taken_over_and_a_live_ones_is_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / run_folder.LOCK
    lock.write_text(f"{dead.pid}\n")
    with run_folder.RunLock(tmp_path):
        assert lock.read_text() == f"{os.getpid()}\n"
    assert not lock.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{live.pid}\n")
        with pytest.raises(UserError, match=f"process {live.pid} is writing"):
            with run_folder.RunLock(tmp_path):
                pass
        assert lock.read_text() == f"{live.pid}\n"
    finally:
        live.kill()
        live.wait()



PROBE_FOLDER = """
import sys
from fastl2r import _io
for _ in range(3000):
    _io.check_writable(sys.argv[1])
"""


def test_processes_checking_one_folder_at_once_do_not_trip_over_each_others_probe(tmp_path):
    """torchrun's ranks check the data root at the same moment (just after joining the job): a probe file
    of a shared name was deleted under one rank by the other (FileNotFoundError, exit 1)."""
    folder = tmp_path / "data"
    probes = [subprocess.Popen([sys.executable, "-c", PROBE_FOLDER, str(folder)], stderr=subprocess.PIPE, text=True)
              for _ in range(3)]
    errors = [p.communicate(timeout=300)[1] for p in probes]
    assert [p.returncode for p in probes] == [0, 0, 0], errors
    assert list(folder.iterdir()) == []


# ----- faults -----
@pytest.mark.slow
def test_a_nonfinite_storm_stops_meta_training_with_one_line(capsys, env, one_thread, tmp_path):
    code, err = run_main(capsys, "--out", str(tmp_path / "run"), *RUN, "--set", "metatrain.lr=1e30")
    assert code == 2 and len(err) == 1, err
    assert "4 of 4 finished episodes ended with a non-finite loss" in err[0]
    assert "metatrain.lr" in err[0] and "metatrain.meta_lr" in err[0]
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_exactly(reference, capsys, env, one_thread, tmp_path,
                                                             monkeypatch):
    run, real_save, writes = tmp_path / "run", torch.save, []

    def full_disk(obj, f, *args, **kwargs):
        if "metatrain_checkpoint" in str(getattr(f, "name", f)):
            writes.append(f.name)
            if len(writes) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    code, err = run_main(capsys, "--out", str(run), *RUN)
    assert code == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and f"--resume {run}" in err[0]
    assert leftovers(run) == []
    monkeypatch.setattr(torch, "save", real_save)
    code, err = run_main(capsys, "--resume", str(run), "--set", "metatrain.checkpoint_minutes=2")  # bookkeeping
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["metatrain"]["checkpoint_minutes"] == 2.0
    assert outcome(run) == outcome(reference)


# ----- checkpoints -----
def test_checkpoints_at_each_curriculum_stage_and_by_the_clock(env, data_root, monkeypatch):
    saves, real_save = [], MetaTrainer.save

    def counted(self):
        saves.append(self.progress.episode)
        real_save(self)

    monkeypatch.setattr(MetaTrainer, "save", counted)
    for minutes, expected in ((1000.0, [2, 4]), (1e-9, [1, 2, 3, 4])):
        saves.clear()
        config = build_config("exp1", "fmnist", "smoke", overrides=TINY + [
            "metatrain.save_every=100", "metatrain.curriculum_every=2", f"metatrain.checkpoint_minutes={minutes}"])
        MetaTrainer(Workspace(config, data_root=data_root, progress=False)).train(progress=False)
        assert saves == expected, minutes


# ----- bad input: one line, exit 2, no run folder or an untouched one -----
def run_main(capsys, *argv):
    """``main(argv)`` in this process: its exit status and the lines it writes on stderr, a
    warning counted as a line (pytest would otherwise hide it)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines() + [f"warning: {w.message}" for w in caught]


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()} if folder.exists() else None


def saved_run(folder: Path, drop=(), **changes) -> dict:
    """A run folder as a tiny run leaves it before its first checkpoint (``changes`` to its
    config.json, the keys ``drop`` left out)."""
    config = build_config("exp1", "fmnist", "smoke", overrides=TINY)
    folder.mkdir(parents=True, exist_ok=True)
    stored = {**config, "methods_run": ["ours", "sgd"], "device": "cpu", "threads": 1, **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in stored.items() if k not in drop}))
    return config


def metalearner_file(path: Path, arch="resnet8_gn", channels=1, value=None, obj=None):
    if obj is not None:
        torch.save(obj, path)
        return
    meta = MetaLearner(ARCHITECTURES[arch](channels, []))
    if value is not None:
        with torch.no_grad():
            next(meta.parameters()).fill_(value)
    save_metalearner(meta, path, arch=arch)


def checkpoint_file(folder: Path, config: dict, arch=None, obj=None, raw=None, progress=None):
    """``metatrain_checkpoint.pt``: ``raw`` bytes, an object, or a checkpoint of ``config`` whose θ
    is of ``arch`` and whose progress is ``progress``."""
    path = folder / "metatrain_checkpoint.pt"
    if raw is not None:
        path.write_bytes(raw)
        return
    if obj is None:
        meta = MetaLearner(ARCHITECTURES[arch or config["arch"]](1, []))
        obj = {"meta": meta.state_dict(), "optimizer": {}, "slots": {}, "running": {}, "pending": [],
               "progress": progress or {}, "config": config}
    torch.save(obj, path)


def cached_w0(tmp: Path, obj) -> None:
    """``tmp/data``: a data root whose cached ``w0`` of the tiny run is ``obj`` (Fashion-MNIST's
    parsed tensors shared with the tests' data root)."""
    shared = Path(os.environ["FASTL2R_DATA"])
    load_dataset("fashion_mnist", shared, progress=False)
    (tmp / "data").mkdir()
    (tmp / "data" / "fashion_mnist.pt").symlink_to(shared / "fashion_mnist.pt")
    path = Workspace(build_config("exp1", "fmnist", "smoke", overrides=TINY), data_root=tmp / "data").cached_path("w0", 0)
    path.parent.mkdir()
    torch.save(obj, path)


def other_config(**changes):
    config = build_config("exp1", "fmnist", "smoke", overrides=TINY)
    config.update(changes)
    return config


# (name, arguments, setup(tmp_path) run before, environment, message)
NEW = ["exp1", "--suite", "fmnist", "--preset", "smoke", "--device", "cpu"]
BAD_INPUTS = [
    ("unknown experiment", ["exp9"], None, {}, "unknown experiment 'exp9'"),
    ("no experiment", [], None, {}, "the following arguments are required: experiment"),
    ("unknown suite", ["exp1", "--suite", "mnist"], None, {}, "unknown suite 'mnist'"),
    ("unknown preset", ["exp1", "--preset", "fast"], None, {}, "unknown preset 'fast'"),
    ("unknown method", [*NEW, "--methods", "sgd,adam"], None, {}, "unknown method 'adam'"),
    ("no method", [*NEW, "--methods", ","], None, {}, "--methods is empty"),
    ("empty method name", [*NEW, "--methods", "sgd,,teacher"], None, {}, "has an empty name"),
    ("trailing comma", [*NEW, "--methods", "sgd,"], None, {}, "has an empty name"),
    ("zero runs", [*NEW, "--runs", "0"], None, {}, "runs must be a positive"),
    ("runs not a number", [*NEW, "--runs", "x"], None, {}, "invalid int value"),
    ("negative seed", [*NEW, "--seed", "-1"], None, {}, "seed must be a non-negative"),
    ("huge seed", [*NEW, "--seed", str(2 ** 40)], None, {}, "seed must be below 2**32"),
    ("unknown device", [*NEW, "--device", "tpu"], None, {}, "unknown device 'tpu'"),
    ("zero parallel runs", [*NEW, "--parallel-runs", "0"], None, {}, "--parallel-runs 0: give a positive number"),
    ("--set without =", [*NEW, "--set", "metatrain.lr"], None, {}, "--set expects KEY=VALUE"),
    ("unknown key", [*NEW, "--set", "nonexistent.key=1"], None, {}, "unknown key 'nonexistent.key'"),
    ("negative eval_every", [*NEW, "--set", "metatest.eval_every=-5"], None, {}, "metatest.eval_every must be a positive"),
    ("NaN lr", [*NEW, "--set", "readout.lr=NaN"], None, {}, "readout.lr must be a positive finite"),
    ("infinite lr", [*NEW, "--set", "readout.lr=Infinity"], None, {}, "readout.lr must be a positive finite"),
    ("float32 overflow", [*NEW, "--set", "metatrain.meta_lr=1e39"], None, {}, "metatrain.meta_lr=1e+39 overflows float32"),
    ("float32 overflow, lr", [*NEW, "--set", "metatrain.lr=3.5e38"], None, {}, "metatrain.lr=3.5e+38 overflows float32"),
    ("text for a number", [*NEW, "--set", "readout.steps=abc"], None, {}, "expected a value like 100"),
    ("float for an integer", [*NEW, "--set", "metatrain.episodes=1.5"], None, {}, "expected a value like 3"),
    ("list for a threshold", [*NEW, "--set", "metatrain.threshold=[1]"], None, {}, "metatrain.threshold must be [start, step, cap]"),
    ("T-BPTT of 0", [*NEW, "--set", "metatrain.tbptt=[0,2,9]"], None, {}, "metatrain.tbptt must be [start, step, cap]"),
    ("fraction over 1", [*NEW, "--set", "metatrain.max_nonfinite_fraction=1.5"], None, {}, "at most 1"),
    ("unknown objective", [*NEW, "--set", "metatrain.objective=\"mse\""], None, {}, "unknown metatrain.objective 'mse'"),
    ("unknown arch", [*NEW, "--set", "arch=\"vgg\""], None, {}, "unknown arch 'vgg'"),
    ("negative EWC lambda", [*NEW, "--set", "ewc.lambda=-1"], None, {}, "methods.ewc.lambda must be a non-negative"),
    ("experiment by --set", [*NEW, "--set", "experiment=\"exp3\""], None, {}, "--set experiment: not a setting"),
    ("suite by --set", [*NEW, "--set", "suite=\"paper\""], None, {}, "--set suite: not a setting"),
    ("preset by --set", [*NEW, "--set", "preset=\"quick\""], None, {}, "--set preset: not a setting"),
    ("no meta-training task", [*NEW, "--set", "tasks.meta_train=[]"], None, {}, "tasks.meta_train is empty"),
    ("no meta-test task", [*NEW, "--set", "tasks.meta_test=[]"], None, {}, "tasks.meta_test is empty"),
    ("malformed task", [*NEW, "--set", "tasks.meta_test=[{\"dataset\": \"fashion_mnist\"}]"], None, {},
     "tasks.meta_test[0] must be a task with the keys"),
    ("unknown dataset", [*NEW, "--set", "tasks.source.dataset=\"mnist\""], None, {}, "unknown tasks.source.dataset 'mnist'"),
    ("repeated class", [*NEW, "--set", "tasks.source.classes=[0,0]"], None, {}, "list of distinct class indices"),
    ("class out of range", [*NEW, "--set", "tasks.source.classes=[0,99]"], None, {}, "fashion_mnist has no class [99]"),
    ("pool too small", [*NEW, "--set", "tasks.meta_train=[{\"dataset\": \"fashion_mnist\", \"pool\": [5, 6], "
                        "\"ways\": 3, \"train_part\": \"all\"}]"], None, {}, "ways must be an integer from 1 to 2"),
    ("unknown backend", NEW, None, {"FASTL2R_BACKEND": "bogus"}, "unknown backend 'bogus'"),
    ("data root is a file", NEW, lambda t: (t / "file").write_text("x"), {"FASTL2R_DATA": "{tmp}/file"},
     "the data root {tmp}/file is a file"),
    ("data root unwritable", NEW, None, {"FASTL2R_DATA": "/proc/fastl2r-data"}, "the data root /proc/fastl2r-data is not writable"),
    ("--out is a file", [*NEW, "--out", "{tmp}/file"], lambda t: (t / "file").write_text("x"), {}, "it is a file"),
    ("--out under a file", [*NEW, "--out", "{tmp}/file/run"], lambda t: (t / "file").write_text("x"), {},
     "cannot write to the output folder"),
    ("--out holds files", [*NEW, "--out", "{tmp}/run"], lambda t: saved_run(t / "run"), {}, "already holds files"),
    ("--metalearner missing", [*NEW, "--metalearner", "{tmp}/none.pt"], None, {}, "no such file"),
    ("--metalearner garbage", [*NEW, "--metalearner", "{tmp}/m.pt"], lambda t: (t / "m.pt").write_bytes(b"\x80garbage"),
     {}, "cannot read the meta-learner"),
    ("--metalearner a list", [*NEW, "--metalearner", "{tmp}/m.pt"], lambda t: metalearner_file(t / "m.pt", obj=[1, 2]),
     {}, "is not a meta-learner"),
    ("--metalearner a dict", [*NEW, "--metalearner", "{tmp}/m.pt"], lambda t: metalearner_file(t / "m.pt", obj={"foo": 1}),
     {}, "is not a meta-learner"),
    ("--metalearner NaN", [*NEW, "--set", "arch=\"resnet8_gn\"", "--metalearner", "{tmp}/m.pt"],
     lambda t: metalearner_file(t / "m.pt", value=float("nan")), {}, "has non-finite weights"),
    ("--metalearner of another arch", [*NEW, "--set", "arch=\"resnet8_gn\"", "--metalearner", "{tmp}/m.pt"],
     lambda t: metalearner_file(t / "m.pt", arch="resnet14_gn"), {},
     "was trained for resnet14_gn, but this run's network is resnet8_gn"),
    ("--metalearner of other channels", [*NEW, "--set", "arch=\"resnet8_gn\"", "--metalearner", "{tmp}/m.pt"],
     lambda t: metalearner_file(t / "m.pt", channels=3), {},
     "first difference: conv.weight [16, 3, 3, 3] there, conv.weight [16, 1, 3, 3] here"),
    ("cached w0 a dict", RUN, lambda t: cached_w0(t, {"foo": 1}), {"FASTL2R_DATA": "{tmp}/data"},
     "is not a network checkpoint"),
    ("cached w0 of another network", RUN, lambda t: cached_w0(t, {"model": ARCHITECTURES["resnet14_gn"](1, [5]).state_dict()}),
     {"FASTL2R_DATA": "{tmp}/data"}, "does not fit this run's resnet8_gn network"),
    ("--resume of no run", ["--resume", "{tmp}/run"], lambda t: (t / "run").mkdir(), {}, "no config.json there"),
    ("--resume, config not JSON", ["--resume", "{tmp}/run"],
     lambda t: (t / "run").mkdir() or (t / "run" / "config.json").write_text("{"), {}, "cannot be read as JSON"),
    ("--resume, config a list", ["--resume", "{tmp}/run"],
     lambda t: (t / "run").mkdir() or (t / "run" / "config.json").write_text("[1]"), {}, "not a list"),
    ("--resume, no experiment", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", drop=["experiment"]), {},
     "lacks 'experiment'"),
    ("--resume, no metatrain", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", drop=["metatrain"]), {},
     "lacks 'metatrain'"),
    ("--resume, metatrain not a section", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", metatrain=3), {},
     "metatrain must be a section"),
    ("--resume, zero runs", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", runs=0), {}, "runs must be a positive"),
    ("--resume, episodes as text", ["--resume", "{tmp}/run"],
     lambda t: saved_run(t / "run", metatrain={**other_config()["metatrain"], "episodes": "three"}), {},
     "metatrain.episodes: expected a value like 3, got \"three\""),
    ("--resume, no methods", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", methods_run="ours"), {},
     "methods_run must be a list"),
    ("--resume, bad threads", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", threads=0), {},
     "threads must be a positive integer"),
    ("--resume, bad parallel_runs", ["--resume", "{tmp}/run"], lambda t: saved_run(t / "run", parallel_runs=0), {},
     "parallel_runs must be a positive integer"),
    ("--resume, other parallel runs", ["--resume", "{tmp}/run", "--parallel-runs", "3"],
     lambda t: saved_run(t / "run"), {}, "would change it: --parallel-runs (1 → 3)"),
    ("--resume, another experiment", ["exp2", "--resume", "{tmp}/run"], lambda t: saved_run(t / "run"), {},
     "is a run of exp1, not exp2"),
    ("--resume, unknown key", ["--resume", "{tmp}/run", "--set", "nonexistent.key=1"], lambda t: saved_run(t / "run"),
     {}, "unknown key 'nonexistent.key'"),
    ("--resume, another meta_lr", ["--resume", "{tmp}/run", "--set", "metatrain.meta_lr=0.01"],
     lambda t: saved_run(t / "run"), {}, "would change it: metatrain.meta_lr (0.001 → 0.01)"),
    ("--resume, another seed", ["--resume", "{tmp}/run", "--seed", "0", "--runs", "3"],
     lambda t: saved_run(t / "run", seed=5), {}, "would change it: runs (2 → 3), seed (5 → 0)"),
    ("--resume, other methods", ["--resume", "{tmp}/run", "--methods", "sgd"], lambda t: saved_run(t / "run"), {},
     "--methods (ours,sgd → sgd)"),
    ("--resume, another --out", ["--resume", "{tmp}/run", "--out", "{tmp}/other"], lambda t: saved_run(t / "run"), {},
     "--out"),
    ("--resume, checkpoint garbage", ["--resume", "{tmp}/run"],
     lambda t: checkpoint_file(t / "run", saved_run(t / "run"), raw=b"PK\x03\x04 truncated"), {},
     "cannot read the meta-training checkpoint"),
    ("--resume, checkpoint a dict", ["--resume", "{tmp}/run"],
     lambda t: checkpoint_file(t / "run", saved_run(t / "run"), obj={"foo": 1}), {}, "is not a meta-training checkpoint"),
    ("--resume, checkpoint of another run", ["--resume", "{tmp}/run"],
     lambda t: saved_run(t / "run") and checkpoint_file(t / "run", other_config(seed=7)), {},
     "is the checkpoint of another configuration (seed (7 → 0))"),
    ("--resume, episodes below those started", ["--resume", "{tmp}/run", "--set", "metatrain.episodes=2"],
     lambda t: checkpoint_file(t / "run", saved_run(t / "run"), progress={"started": 3}), {},
     "metatrain.episodes=2 is fewer than the 3 episodes this run has already started; set it to at least 3"),
    ("--resume, episodes after all started", ["--resume", "{tmp}/run", "--set", "metatrain.episodes=6"],
     lambda t: checkpoint_file(t / "run", saved_run(t / "run"), progress={"started": 4}), {},
     "all 4 episodes of this run's meta-training have started; start a new run to train longer"),
    ("--resume, checkpoint of another network", ["--resume", "{tmp}/run"],
     lambda t: checkpoint_file(t / "run", saved_run(t / "run"), arch="resnet14_gn"), {},
     "does not fit this run's resnet8_gn network"),
    ("--resume, meta-test progress garbage", ["--resume", "{tmp}/run"],
     lambda t: saved_run(t / "run") and (t / "run" / "metatest_progress.pt").write_bytes(b"junk"), {},
     "cannot read the meta-test progress"),
]


@pytest.mark.parametrize("name,argv,setup,environment,message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_leaves_no_run_folder(capsys, env, monkeypatch, tmp_path, name, argv, setup,
                                                               environment, message):
    if setup is not None:
        setup(tmp_path)
    for key, value in environment.items():
        monkeypatch.setenv(key, value.replace("{tmp}", str(tmp_path)))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    fresh = "--resume" not in argv
    if fresh and "--out" not in argv:
        argv += ["--out", str(tmp_path / "new")]
    before = {p.name: snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    code, err = run_main(capsys, *argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in err[0], err
    after = {p.name: snapshot(p) if p.is_dir() else p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # nothing made, nothing touched
