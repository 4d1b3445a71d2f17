"""Meta-test runs side by side (``--parallel-runs``): in float64 a slot's step is its run's step alone
(SGD, the teacher, ours with the learned rule and its δ samples), with the one-by-one learners as the
oracle; end to end, each run draws the heads it draws alone and its curve is the one-by-one run's up to
float32 round-off; the CLI records the choice and a resume keeps it."""
import copy
import json

import pytest
import torch

from fastl2r.baselines.sgd import SGDLearner
from fastl2r.baselines.teacher import SlotTeacher, TeacherLearner
from fastl2r.data import Batch
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner
from fastl2r.meta.ours import OursLearner, SlotOurs
from fastl2r.metatest import run_metatest
from fastl2r.models import resnet8_gn
from fastl2r.ops import unpack_head
from fastl2r.run_slots import RunRNGs, SlotNetwork, SlotSGD, stack
from fastl2r.workspace import Workspace

RUNS, SEEDS = [0, 1, 2], {0: 11, 1: 12, 2: 13}


def networks():
    """Three float64 networks of other weights, each with Task A's head."""
    models = []
    for run in RUNS:
        torch.manual_seed(100 + run)
        models.append(resnet8_gn(1, [4]).double())
    return models


def add_heads(*model_lists) -> None:
    """The new task's head of each run, drawn alike in each list."""
    for models in model_lists:
        for run, model in zip(RUNS, models):
            torch.manual_seed(200 + run)
            model.add_head(3)


def batches(step: int, classes: int, task: int = 0, n: int = 6) -> list[Batch]:
    g = torch.Generator().manual_seed(1000 * step + classes)
    return [Batch(torch.randn(n, 1, 16, 16, generator=g, dtype=torch.float64),
                  torch.randint(0, classes, (n,), generator=g), torch.full((n,), task)) for _ in RUNS]


def float64_meta(model) -> MetaLearner:
    meta = MetaLearner(model, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a random output head: δ varies, so a slot mixed up with another would show
        for group, head in zip(meta.groups, meta.head):
            w_out, _, _ = unpack_head(head, group.dims)
            w_out.copy_(torch.randn(w_out.shape, generator=g, dtype=torch.float64) * 0.3)
    return meta.requires_grad_(False)


def assert_same_networks(network: SlotNetwork, alone: list) -> None:
    network.write_back()
    for slotted, model in zip(network.models, alone, strict=True):
        for (name, a), (_, b) in zip(slotted.named_parameters(), model.named_parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", ["sgd", "teacher", "ours"])
def test_a_slots_steps_are_its_runs_steps_alone_in_float64(method):
    models = networks()
    alone = copy.deepcopy(models)
    deltas_alone, deltas_slotted = {}, {}
    rngs = RunRNGs(SEEDS, torch.device("cpu"))
    if method == "ours":  # made before the new heads, as in a run
        meta = float64_meta(resnet8_gn(1))
        learners = [OursLearner(m, meta, deltas_alone if run == 0 else None, 2) for run, m in zip(RUNS, alone)]
        add_heads(models, alone)
        network = SlotNetwork(models)
        slotted = SlotOurs(network, meta, RUNS, rngs, deltas_slotted, 2)
    else:
        add_heads(models, alone)
        network = SlotNetwork(models)
        kind, slot_kind = (SGDLearner, SlotSGD) if method == "sgd" else (TeacherLearner, SlotTeacher)
        learners = [kind(m, 0.05) for m in alone]
        slotted = slot_kind(network, 0.05)
    for learner in learners:
        learner.begin_task(1, None)
    slotted.begin_task(1)
    torch.manual_seed(SEEDS[0])  # run 0 alone draws its δ samples from its own seed
    for step in range(4):
        new, old = batches(step, 3), batches(step, 4, n=5)
        for run, learner in zip(RUNS, learners):
            learner.step(new[run], old[run] if method == "teacher" else None)
        slotted.step(stack(new), stack(old) if method == "teacher" else None)
    assert_same_networks(network, alone)
    if method == "ours":  # δ of run 0's steps 2 and 4, the same elements drawn
        assert deltas_alone and deltas_alone.keys() == deltas_slotted.keys()
        for kind in deltas_alone:
            for a, b in zip(deltas_alone[kind], deltas_slotted[kind], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_slot_without_run_0_keeps_no_deltas():
    models = networks()[1:]
    add_heads(models)
    deltas = {}
    slotted = SlotOurs(SlotNetwork(models), float64_meta(resnet8_gn(1)), [1, 2],
                       RunRNGs({1: 12, 2: 13}, torch.device("cpu")), deltas, 1)
    slotted.begin_task(1)
    slotted.step(stack(batches(0, 3)[1:]), None)
    assert deltas == {}


def test_each_run_draws_from_its_own_generator_and_the_global_one_is_left_alone():
    rngs = RunRNGs({0: 11, 1: 12}, torch.device("cpu"))
    torch.manual_seed(3)
    before = torch.rand(2)
    with rngs.use(1):
        first = torch.rand(3)
    with rngs.use(0):
        zero = torch.rand(3)
    with rngs.use(1):
        second = torch.rand(3)
    after = torch.rand(2)
    assert torch.equal(torch.cat([before, after]), torch.rand(4, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(torch.cat([first, second]), torch.rand(6, generator=torch.Generator().manual_seed(12)))
    assert torch.equal(zero, torch.rand(3, generator=torch.Generator().manual_seed(11)))


# ----- the meta-test end to end -----
def workspace(tmp_path) -> Workspace:
    config = build_config("exp5", "fmnist", "smoke", runs=3, overrides=[
        'arch="resnet8_gn"', "pretrain.epochs=0.03", "metatest.steps_per_task=3", "metatest.eval_every=3",
        "readout.steps=20", "metatrain.episodes=2", "metatrain.episode_steps=2"])
    return Workspace(config, data_root=tmp_path, progress=False)


def test_runs_side_by_side_give_the_runs_alone_up_to_round_off(tmp_path):
    ws = workspace(tmp_path)
    methods = ["ours", "sgd", "teacher", "lwf"]  # lwf cannot: its runs go one by one in either case
    alone, together = (run_metatest(ws, methods, parallel_runs=p) for p in (1, 3))
    assert alone["task_names"] == together["task_names"]
    steps = alone["eval_steps"]
    for name in methods:
        for kind in ("readout", "original"):
            for task, runs in alone["methods"][name]["runs"][kind].items():
                for run, (a, b) in enumerate(zip(runs, together["methods"][name]["runs"][kind][task], strict=True)):
                    # the heads drawn and the weights at each task's start are the run's own: equal; after
                    # a few steps float32 round-off (grouped against plain convolutions) may flip an example
                    assert a[0] == b[0], (name, kind, task, run)
                    assert [x is None for x in a] == [x is None for x in b]
                    assert all(abs(x - y) <= 0.03 for x, y in zip(a, b) if x is not None), (name, kind, task, run, a, b)
    assert alone["methods"]["lwf"]["runs"] == together["methods"]["lwf"]["runs"]
    assert len(steps) == 3


def test_parallel_runs_must_be_a_positive_integer(tmp_path):
    from fastl2r.errors import UserError
    with pytest.raises(UserError, match="parallel_runs must be a positive integer"):
        run_metatest(workspace(tmp_path), ["sgd"], parallel_runs=0)


def test_the_command_line_records_parallel_runs_and_a_resume_keeps_them(tmp_path, monkeypatch, capsys):
    from fastl2r.train import main
    monkeypatch.setenv("FASTL2R_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    argv = ["exp1", "--suite", "fmnist", "--preset", "smoke", "--methods", "sgd,teacher", "--runs", "3",
            "--no-progress", "--device", "cpu", "--set", 'arch="resnet8_gn"', "--set", "pretrain.epochs=0.02",
            "--set", "metatest.steps_per_task=2", "--set", "metatest.eval_every=2", "--set", "readout.steps=10"]
    assert main([*argv, "--parallel-runs", "2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert config["parallel_runs"] == 2 and len(results["methods"]["teacher"]["runs"]["readout"]["task1"]) == 3
    (out / "results.json").unlink()  # as if stopped before the end: --resume finds every run done
    assert main(["--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    assert json.loads((out / "config.json").read_text())["parallel_runs"] == 2
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0  # the CPU's default: one at a time
    assert json.loads((tmp_path / "default" / "config.json").read_text())["parallel_runs"] == 1


@pytest.mark.parametrize("name", ["sgd", "sgd_x0.1", "sgd_mean_delta", "maml", "rep", "teacher"])
def test_every_sgd_protocol_method_steps_its_slots_at_its_own_learning_rate(tmp_path, name):
    from fastl2r.methods import method_class
    ws = workspace(tmp_path)
    method = method_class(name)(ws, ws.config["methods"][name])
    if name == "sgd_mean_delta":
        method.lr = 0.037  # what prepare() measures
    models = networks()
    add_heads(models)
    slotted = method.slot_learner(SlotNetwork(models), RUNS, RunRNGs(SEEDS, torch.device("cpu")))
    assert type(slotted) is (SlotTeacher if name == "teacher" else SlotSGD)
    assert slotted.lr == method.learner(models[0], 0).lr
    assert slotted.lr == {"sgd_mean_delta": 0.037}.get(name, ws.config["methods"][name].get("lr"))
