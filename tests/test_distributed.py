"""Meta-training across processes (torch.distributed, Gloo on the CPU): two ranks of one slot each
train the θ one process of two slots trains, up to the order of the gradient sums, and keep θ
identical on every rank."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastl2r import distributed
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.ops import unpack_head
from fastl2r.workspace import Workspace

OVERRIDES = ['arch="resnet8_gn"', "pretrain.epochs=0.02", "metatrain.batch_size=4", "metatrain.episode_steps=4",
             "metatrain.episodes=5", "metatrain.parallel_episodes=2", "metatrain.threshold=[3.0, 100.0, 100.0]",
             "metatrain.tbptt=[2, 1, 3]", "metatrain.curriculum_every=2"]


def workspace(data_root) -> Workspace:
    return Workspace(build_config("exp1", "fmnist", "smoke", overrides=OVERRIDES), data_root=data_root, progress=False)


def float64_trainer(ws: Workspace, ranks=distributed.SINGLE, run_dir=None) -> MetaTrainer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        meta = MetaLearner(ws.new_model(), dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a random output head, so that δ depends on θ everywhere
        for group, head in zip(meta.groups, meta.head):
            w_out, _, _ = unpack_head(head, group.dims)
            w_out.copy_(torch.randn(w_out.shape, generator=g, dtype=torch.float64) * 0.3)
    return MetaTrainer(ws, meta=meta, ranks=ranks, run_dir=run_dir)


def _rank_main(rank: int, world: int, port: int, data_root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks, device = distributed.setup("cpu")
    try:
        trainer = float64_trainer(workspace(data_root), ranks)
        trainer.train(progress=False)
        torch.save({"theta": [p.detach() for p in trainer.meta.parameters()],
                    "history": trainer.progress.history, "slots": trainer.slots}, f"{out}/rank{rank}.pt")
    finally:
        distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_what_one_process_with_their_slots_trains(tmp_path):
    ws = workspace(tmp_path)
    ws.pretrained_state(0)  # built once, cached for the ranks
    single = float64_trainer(ws)
    single.train(progress=False)
    assert single.slots == 2 and {r["ended_by"] for r in single.progress.history} >= {"threshold", "horizon"}
    mp.start_processes(_rank_main, args=(2, free_port(), str(tmp_path), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["slots"] for r in ranks] == [1, 1]
    for a, b in zip(ranks[0]["theta"], ranks[1]["theta"]):
        assert torch.equal(a, b)  # θ identical on every rank
    for a, b in zip(ranks[0]["theta"], single.meta.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-10, atol=1e-12)
    assert ranks[0]["history"] == ranks[1]["history"]
    for mine, truth in zip(ranks[0]["history"], single.progress.history, strict=True):
        assert (mine["episode"], mine["steps"], mine["ended_by"]) == (truth["episode"], truth["steps"], truth["ended_by"])
        assert mine["final_loss"] == pytest.approx(truth["final_loss"], rel=1e-10)


def test_slots_must_divide_among_the_ranks(tmp_path):
    from fastl2r.errors import UserError
    with pytest.raises(UserError, match="do not divide among 2 ranks"):
        MetaTrainer(Workspace(build_config("exp1", "fmnist", "smoke", overrides=[
            'arch="resnet8_gn"', "metatrain.parallel_episodes=3"]), data_root=tmp_path, progress=False),
            ranks=distributed.Ranks(0, 2))


# ----- the command line under torchrun -----
SMOKE = ["exp1", "--suite", "fmnist", "--preset", "smoke", "--methods", "ours,sgd", "--runs", "3", "--no-progress",
         "--device", "cpu", "--set", 'arch="resnet8_gn"', "--set", "pretrain.epochs=0.02",
         "--set", "metatrain.episodes=4", "--set", "metatrain.episode_steps=4", "--set", "metatrain.parallel_episodes=2",
         "--set", "metatrain.save_every=1", "--set", "metatest.steps_per_task=4", "--set", "metatest.eval_every=2",
         "--set", "readout.steps=20"]
KILL_RANK_1 = """
import os, signal, sys
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.train import main
real, windows = MetaTrainer.run_window, []

def run_window(self):
    windows.append(1)
    if os.environ["RANK"] == "1" and len(windows) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # one rank dies in the middle of meta-training
    return real(self)

MetaTrainer.run_window = run_window
sys.exit(main(sys.argv[1:]))
"""


def launch(tmp_path, out, *extra, ranks=2, script=None, whole=True):
    """``torchrun --nproc-per-node=ranks`` (or one process) of the CLI on the smoke run (``whole=False``:
    of ``extra`` alone, e.g. a ``--resume``)."""
    env = {**os.environ, "FASTL2R_DATA": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    program = ([str(script)] if script else ["-m", "fastl2r.train"])
    runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    command = [sys.executable, *runner, *program, *((*SMOKE, "--out", str(out)) if whole else ()), *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def ranks_stderr(job: subprocess.CompletedProcess) -> str:
    """The end of what the ranks printed, before torchrun's own report of a failure (which would fill an
    assertion message and hide a rank's traceback)."""
    report = re.search(r"^.*elastic/multiprocessing/api\.py.*\] failed", job.stderr, re.M)
    return job.stderr[:report.start() if report else None][-3000:]


def test_torchrun_gives_the_single_process_results_and_resumes_after_a_rank_dies(tmp_path):
    single = launch(tmp_path, tmp_path / "single", ranks=1)
    assert single.returncode == 0, ranks_stderr(single)
    job = launch(tmp_path, tmp_path / "job")
    assert job.returncode == 0, ranks_stderr(job)
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("single", "job"))
    for name in ("ours", "sgd"):  # runs 0 and 2 on rank 0, run 1 on rank 1
        assert two["methods"][name]["runs"] == one["methods"][name]["runs"], name
    assert two["task_names"] == one["task_names"]
    meta = [torch.load(tmp_path / d / "metalearner.pt", weights_only=True)["meta"] for d in ("single", "job")]
    for key in meta[0]:  # float32: one bucketed sum over ranks against a folded network's.  Adam steps by about
        # lr·sign(g) where g is tiny, so the round-off of near-zero gradients flips a few of θ's elements by
        # up to 2·lr per step; the rest agree (the float64 test above holds the whole θ to 1e-10)
        far = (meta[1][key] - meta[0][key]).abs() > 1e-4
        assert far.double().mean() < 0.01, (key, far.double().mean().item())
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())
    shares = [json.loads((tmp_path / d / "config.json").read_text())["ranks"] for d in ("single", "job")]
    assert shares[0] == {"processes": 1, "metatrain_slots": [[0, 1]], "metatest_runs": [[0, 1, 2]]}
    assert shares[1] == {"processes": 2, "metatrain_slots": [[0], [1]], "metatest_runs": [[0, 2], [1]]}

    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    killed = launch(tmp_path, tmp_path / "killed", script=script)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "results.json").exists()
    assert (tmp_path / "killed" / "metatrain_checkpoint.pt").exists()
    shutil.copytree(tmp_path / "killed", tmp_path / "killed-alone")
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              "-m", "fastl2r.train", "--resume", str(tmp_path / "killed")], capture_output=True,
                             text=True, env={**os.environ, "FASTL2R_DATA": str(tmp_path / "data"),
                                             "OMP_NUM_THREADS": "1"}, timeout=900)
    assert resumed.returncode == 0, ranks_stderr(resumed)
    after = torch.load(tmp_path / "killed" / "metalearner.pt", weights_only=True)["meta"]
    for key in meta[1]:
        assert torch.equal(after[key], meta[1][key]), key  # the same slot layout: exactly the job's θ
    again = json.loads((tmp_path / "killed" / "results.json").read_text())
    for name in ("ours", "sgd"):  # (the info holds timings)
        assert again["methods"][name]["runs"] == two["methods"][name]["runs"], name

    # resumed by one process instead of two: the same 2 slots go on in one folded network, so θ is the
    # job's up to the reduction order, as above; the baselines' results are exactly the job's
    alone = launch(tmp_path, None, "--resume", str(tmp_path / "killed-alone"), ranks=1, whole=False)
    assert alone.returncode == 0, ranks_stderr(alone)
    after = torch.load(tmp_path / "killed-alone" / "metalearner.pt", weights_only=True)["meta"]
    for key in meta[1]:
        assert ((after[key] - meta[1][key]).abs() > 1e-4).double().mean() < 0.01, key
    alone_results = json.loads((tmp_path / "killed-alone" / "results.json").read_text())
    assert alone_results["methods"]["sgd"]["runs"] == two["methods"]["sgd"]["runs"]
    assert json.loads((tmp_path / "killed-alone" / "config.json").read_text())["ranks"]["processes"] == 1


def test_slots_that_do_not_divide_among_the_processes_exit_2_on_every_rank(tmp_path):
    job = launch(tmp_path, tmp_path / "job", "--set", "metatrain.parallel_episodes=3")
    assert job.returncode != 0 and not (tmp_path / "job").exists()
    errors = [line for line in job.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("do not divide among the job's 2 processes" in e for e in errors), ranks_stderr(job)


def test_ranks_take_their_runs_side_by_side(tmp_path):
    """--parallel-runs 2 under two ranks: rank 0 meta-tests runs 0 and 2 side by side, rank 1 run 1 alone,
    one gather; each run's curve is the one-process, one-by-one run's (run 1's exactly: it ran alone)."""
    single = launch(tmp_path, tmp_path / "single", ranks=1)
    assert single.returncode == 0, ranks_stderr(single)
    job = launch(tmp_path, tmp_path / "job", "--parallel-runs", "2")
    assert job.returncode == 0, ranks_stderr(job)
    assert json.loads((tmp_path / "job" / "config.json").read_text())["parallel_runs"] == 2
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("single", "job"))
    assert two["task_names"] == one["task_names"]
    runs = one["methods"]["sgd"]["runs"]["readout"]
    for task, rows in two["methods"]["sgd"]["runs"]["readout"].items():
        assert rows[1] == runs[task][1]
        for run in (0, 2):  # float32 round-off of the folded network may flip an example or so
            assert rows[run][0] == runs[task][run][0]
            assert all(abs(a - b) <= 0.05 for a, b in zip(rows[run], runs[task][run]) if a is not None)
