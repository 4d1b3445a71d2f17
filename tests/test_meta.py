"""The meta-learner and Algorithm 1 (DESIGN §1.3–1.4) against independent truth."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastl2r.data import Batch
from fastl2r.experiments import CURRICULA, build_config, curriculum_at
from fastl2r.meta import MetaLearner
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.meta.unroll import Unroll
from fastl2r.workspace import Workspace
from fastl2r.models import resnet14_gn, resnet32_gn
from fastl2r.ops import unpack_head

DT = torch.float64


class TinyNet(nn.Module):
    """Conv + GroupNorm, twice, then a global pool: a 4-d representation."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(2, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 2)])

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(x))).mean((2, 3))


def tiny_setup(seed=0):
    torch.manual_seed(seed)
    net = TinyNet().to(DT)
    with torch.no_grad():  # GroupNorm affine away from (1, 0) so every path matters
        for m in (net.gn1, net.gn2):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    meta = MetaLearner(net, conv_hidden=6, norm_hidden=3, dtype=DT)
    return net, meta


def batch(n, classes, task, seed):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g),
                 torch.full((n,), task, dtype=torch.long))


def test_meta_nets_cover_every_conv_and_groupnorm_tensor_of_resnet32():
    meta = MetaLearner(resnet32_gn(3, [5]))
    assert len(meta.meta_tensors) == 93  # 31 conv weights + 31 GroupNorms × (γ, β)
    assert 9.7e6 < sum(p.numel() for p in meta.parameters()) < 9.9e6
    assert {g.dims.H for g in meta.groups} == {64, 32}
    assert MetaLearner(resnet14_gn(1, [2])).plain_parameters == ("heads.0.weight", "heads.0.bias")


def randomise_head(meta, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group, head in zip(meta.groups, meta.head):
            w_out, _, _ = unpack_head(head, group.dims)
            w_out.copy_(torch.randn(w_out.shape, generator=g, dtype=DT) * scale)


class FrozenConstants:
    """Records, then replays, everything the meta-gradient treats as a constant: the student's
    gradients and activation means fed to the meta-learner, and every RMS of the features.
    Finite differences of the replayed function are the truth the meta-gradient must match."""

    def __init__(self, monkeypatch):
        from fastl2r.ops import reference
        self.step_inputs, self.rms, self.replaying, self.position = [], [], False, 0
        real_step, real_rms = MetaLearner.step, reference.rms_normalise

        def step(meta, weights, grads, means, state, theta=None):
            if self.replaying:
                grads, means = self.step_inputs[self.position]
                self.position += 1
            else:
                self.step_inputs.append((grads, means))
            return real_step(meta, weights, grads, means, state, theta)

        def rms_normalise(x):
            if not self.replaying:
                self.rms.append(x.detach().square().mean().sqrt())
                return real_rms(x)
            value = self.rms[self.rms_position]
            self.rms_position += 1
            return x / (value + 1e-8)

        monkeypatch.setattr(MetaLearner, "step", step)
        monkeypatch.setattr(reference, "rms_normalise", rms_normalise)

    def replay(self):
        self.replaying, self.position, self.rms_position = True, 0, 0


@pytest.mark.parametrize("experiment", ["exp1", "exp2", "exp5"])
def test_curriculum_follows_the_table(experiment):
    config = build_config(experiment, "paper", "paper")
    table = CURRICULA[experiment]
    t0, dt, tcap = table["threshold"]
    s0, ds, scap = table["tbptt"]
    assert config["metatrain"]["episodes"] == table["episodes"]
    assert config["metatrain"]["loss_scale"] == table["loss_scale"]
    for episode in range(table["episodes"]):
        level = episode // 300  # a counter, as Algorithm 1's curriculum
        assert curriculum_at(config, episode) == (min(t0 + dt * level, tcap), min(s0 + ds * level, scap))
    assert curriculum_at(config, 299) != curriculum_at(config, 300)
    assert curriculum_at(config, 300) == curriculum_at(config, 599)


# ----- the trainer on a small real experiment -----
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def small_experiment(data_root, run_dir=None, experiment="exp1", **overrides):
    items = ["arch=\"resnet8_gn\"", "pretrain.epochs=0.02", "metatrain.batch_size=8", "metatrain.episode_steps=3",
             "metatrain.episodes=4", "metatrain.save_every=1", "metatrain.parallel_episodes=1"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    config = build_config(experiment, "fmnist", "smoke", overrides=items)
    return Workspace(config, data_root=data_root, out_dir=run_dir, progress=False)


def float64_trainer(experiment, run_dir=None):
    """A trainer whose θ is float64 with a random output head (so δ depends on θ everywhere)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        meta = MetaLearner(experiment.new_model(), dtype=DT)
    randomise_head(meta)
    return MetaTrainer(experiment, meta=meta, run_dir=run_dir)


# Thresholds low enough that some episodes restart, T-BPTT windows of 2 and 3, and in
# Experiment 5 a switch to the second new task: every branch of Algorithm 1 runs.
ALGORITHM_1 = {"metatrain.threshold": "[2.0, 100.0, 100.0]", "metatrain.tbptt": "[2, 1, 3]",
               "metatrain.curriculum_every": 2, "metatrain.episode_steps": 4}


@pytest.mark.parametrize("experiment", ["exp1", "exp3", "exp5"])
def test_one_slot_is_the_sequential_algorithm(data_root, experiment):
    """θ after every Adam step, the losses, the steps and the restarts of the vectorised trainer
    with one slot equal those of Algorithm 1 run one episode at a time over plain modules
    (tests/sequential_algorithm1.py), to float64 round-off."""
    from fastl2r import ops
    from sequential_algorithm1 import sequential_metatraining

    exp = small_experiment(data_root, experiment=experiment, **ALGORITHM_1)
    with ops.use_backend("reference"):
        vectorised = float64_trainer(exp)
        vectorised.train(progress=False)
        sequential = float64_trainer(exp)
        records = sequential_metatraining(sequential, exp.config["metatrain"]["episodes"])
    assert {r["ended_by"] for r in records} >= {"threshold", "horizon"}
    for mine, truth in zip(vectorised.progress.history, records, strict=True):
        assert (mine["steps"], mine["ended_by"], mine["checkpoint"], mine["tasks_reached"]) == (
            truth["steps"], truth["ended_by"], truth["checkpoint"], truth["tasks_reached"])
        assert mine["final_loss"] == pytest.approx(truth["losses"][-1], rel=1e-10)
        assert mine["mean_loss"] == pytest.approx(sum(truth["losses"]) / len(truth["losses"]), rel=1e-10)
    assert vectorised.progress.inner_steps == sum(r["steps"] for r in records)
    for a, b in zip(vectorised.meta.parameters(), sequential.meta.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if experiment == "exp5":
        assert any(r["tasks_reached"] == 2 for r in records)


def test_slots_are_independent_episodes(data_root):
    """With θ held fixed (meta lr 0), an episode's losses do not depend on how many slots run
    beside it: two slots give every episode the losses one slot gives it."""
    from fastl2r import ops

    runs = {}
    for slots in (1, 2):
        exp = small_experiment(data_root, **{**ALGORITHM_1, "metatrain.parallel_episodes": slots})
        with ops.use_backend("reference"):
            trainer = float64_trainer(exp)
            trainer.optimizer.lr = 0.0
            trainer.train(progress=False)
        runs[slots] = sorted(trainer.progress.history, key=lambda r: r["episode"])
    for one, two in zip(runs[1], runs[2], strict=True):
        assert (one["steps"], one["ended_by"]) == (two["steps"], two["ended_by"])
        assert one["final_loss"] == pytest.approx(two["final_loss"], rel=1e-10)
        assert one["mean_loss"] == pytest.approx(two["mean_loss"], rel=1e-10)


def test_threshold_restarts_the_episode(data_root):
    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.threshold": "[0.0, 5.0, 30.0]",
                                                         "metatrain.curriculum_every": 10}))
    record = trainer.run_window()[0]
    assert record.ended_by == "threshold" and record.steps == 1 and record.final_loss > 0


def test_horizon_and_truncation_run_the_whole_episode(data_root):
    # The threshold out of reach: this test is about the horizon, whatever the loss of w0.
    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.tbptt": "[2, 2, 9]",
                                                         "metatrain.threshold": "[1000.0, 1000.0, 1000.0]"}))
    assert trainer.run_window() == [] and trainer.progress.inner_steps == 2  # a window of 2
    record = trainer.run_window()[0]
    assert record.ended_by == "horizon" and record.steps == 3 and record.tbptt == 2


def test_a_nonfinite_slot_never_reaches_theta_and_the_others_go_on(data_root, monkeypatch):
    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.parallel_episodes": 2, "metatrain.episode_steps": 10,
                                                         "metatrain.threshold": "[1000.0, 1000.0, 1000.0]"}))
    trainer.start_episodes()
    trainer.inner_step()  # one healthy step: θ moves
    real = Unroll.step

    def poisoned(self, theta, state):  # slot 1's loss becomes NaN, in the graph
        state, losses = real(self, theta, state)
        return state, losses * torch.tensor([1.0, float("nan")])

    monkeypatch.setattr(Unroll, "step", poisoned)
    before = [p.detach().clone() for p in trainer.meta.parameters()]
    losses, kept = trainer.inner_step()
    assert kept.tolist() == [True, False] and trainer.state.active.tolist() == [True, False]
    assert trainer.state.ended.tolist() == [0, 3]  # slot 1 stopped as "nonfinite"
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.meta.parameters()))  # NaN in the graph: no step
    monkeypatch.setattr(Unroll, "step", real)
    finished = trainer.run_window()
    assert [(r.episode, r.ended_by) for r in finished] == [(1, "nonfinite")] and trainer.progress.nonfinite == 1
    assert trainer.state.active.tolist() == [True, False] and trainer.state.steps[0] > 2
    assert all(torch.isfinite(p).all() for p in trainer.meta.parameters())


def test_nothing_accumulates_over_episodes(data_root):
    """No hook outlives a step and no cache grows with the number of episodes."""
    from fastl2r.data import sampler

    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.episodes": 6}))
    sizes = []
    for _ in range(2):
        trainer.train(progress=False, stop_after=trainer.progress.episode + 3)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in trainer.skeleton.modules())
        sizes.append((hooks, len(trainer.meta._slot_index), len(sampler._element_cache), len(trainer.running)))
    assert trainer.progress.episode == 6
    assert sizes[0] == sizes[1] and sizes[0][0] == 0


def test_inner_step_reads_nothing_back_to_the_host(data_root):
    from benchmarks.dispatch_counts import DispatchCounter, host_reads

    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.parallel_episodes": 2}))
    trainer.start_episodes()
    with DispatchCounter() as counter:
        for _ in range(2):
            trainer.inner_step()
    assert counter.total > 100 and host_reads(counter) == 0


@pytest.mark.parametrize("first_episodes", [5, 3, 8], ids=["same", "longer on resume", "shorter on resume"])
def test_resume_continues_exactly(data_root, tmp_path, first_episodes):
    """A run resumed mid-episode ends as a straight run does, also when the resume changes the number of
    episodes (to train longer or stop sooner): the straight run is one started with the new count."""
    overrides = {**ALGORITHM_1, "metatrain.threshold": "[1000.0, 0.0, 1000.0]", "metatrain.parallel_episodes": 2,
                 "metatrain.episodes": 5}
    straight = MetaTrainer(small_experiment(data_root, **overrides))
    straight.train(progress=False)
    run_dir = tmp_path / "run"
    first = MetaTrainer(small_experiment(data_root, run_dir, **{**overrides, "metatrain.episodes": first_episodes}),
                        run_dir=run_dir)
    first.run_window()  # a window of 2 steps: both slots are in the middle of their episodes
    first.save()
    assert not (run_dir / "metalearner.pt").exists() and len(first.running) == 2
    resumed = MetaTrainer(small_experiment(data_root, run_dir, **overrides), run_dir=run_dir)
    assert resumed.resume(run_dir) and resumed.progress.episode == first.progress.episode
    resumed.train(progress=False)
    assert (run_dir / "metalearner.pt").exists()
    for a, b in zip(straight.meta.parameters(), resumed.meta.parameters()):
        assert torch.equal(a, b)
    assert straight.progress.history == resumed.progress.history and resumed.progress.episode == 5


def test_tbptt_meta_gradient_matches_central_finite_differences(data_root, monkeypatch):
    """The gradient w.r.t. θ of the third step's meta-loss, through a window of three steps,
    against central finite differences of the same function (constants replayed)."""
    from fastl2r import ops

    exp = small_experiment(data_root, **{"metatrain.batch_size": 4, "metatrain.threshold": "[1e9, 0.0, 1e9]"})
    frozen = FrozenConstants(monkeypatch)
    with ops.use_backend("reference"):
        trainer = float64_trainer(exp)
        trainer.start_episodes()
        start = trainer.state

        def third_loss():
            state = start
            for _ in range(3):
                state, losses = trainer.unroll.step(trainer.meta.theta(), state)
            return losses[0]

        params = list(trainer.meta.parameters())
        grads = torch.autograd.grad(third_loss(), params)
        g = torch.Generator().manual_seed(7)
        directions = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
        eps = 1e-8  # small, so that no ReLU of the network crosses its kink between the two points

        def loss_at(sign):
            with torch.no_grad():
                for p, d in zip(params, directions):
                    p.add_(sign * eps * d)
            frozen.replay()
            value = third_loss().item()
            with torch.no_grad():
                for p, d in zip(params, directions):
                    p.sub_(sign * eps * d)
            return value

        fd = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, directions)).item()
    assert abs(analytic) > 1e-4
    assert abs(analytic - fd) / abs(fd) < 1e-5, (analytic, fd)
    assert all(gr.abs().sum() > 0 for gr in grads)  # every group's LSTM and head get gradient


def test_truncation_cuts_the_graph(data_root):
    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.threshold": "[1e9, 0.0, 1e9]"}))
    trainer.start_episodes()
    for truncate, reaches in ((False, True), (True, False)):
        first = trainer.meta.snapshot()
        state, _ = trainer.unroll.step(first, trainer.state)
        if truncate:
            state = state.detach()
        second = trainer.meta.snapshot()
        _, losses = trainer.unroll.step(second, state)
        earlier = torch.autograd.grad(losses.sum(), list(first.lstm) + list(first.head), allow_unused=True,
                                      retain_graph=True)
        later = torch.autograd.grad(losses.sum(), list(second.lstm) + list(second.head), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in later)
        assert any(g is not None and g.abs().sum() > 0 for g in earlier) == reaches


def test_episode_endings_are_counted_by_threshold():
    from fastl2r.meta.trainer import how_episodes_ended

    history = [{"threshold": 20.0, "ended_by": "threshold"}, {"threshold": 20.0, "ended_by": "horizon"},
               {"threshold": 20.0, "ended_by": "threshold"}, {"threshold": 25.0, "ended_by": "nonfinite"}]
    assert how_episodes_ended(history) == {"20": {"threshold": 2, "horizon": 1, "nonfinite": 0},
                                           "25": {"threshold": 0, "horizon": 0, "nonfinite": 1}}
    assert how_episodes_ended([]) == {}
