"""The meta-learner and Algorithm 1 (DESIGN §1.3–1.4) against independent truth."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastl2r.data import Batch
from fastl2r.experiments import CURRICULA, build_config, curriculum_at
from fastl2r.meta import MetaLearner
from fastl2r.meta.optimizer import LearnedOptimizer
from fastl2r.meta.student import FunctionalStudent
from fastl2r.meta.training import EpisodeState, MetaTrainer, inner_step
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


def test_initial_learned_step_is_bitwise_plain_sgd():
    net, meta = tiny_setup()
    reference = copy.deepcopy(net)
    x = batch(8, 2, 0, seed=1)
    optimizer = LearnedOptimizer(net, meta)
    loss = F.cross_entropy(net.heads[0](net(x.x)), x.y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ref_loss = F.cross_entropy(reference.heads[0](reference(x.x)), x.y)
    grads = torch.autograd.grad(ref_loss, list(reference.parameters()))
    for (name, p), p_ref, g in zip(net.named_parameters(), reference.parameters(), grads):
        assert torch.equal(p, p_ref - 0.1 * g), name


def randomise_head(meta, scale=0.3, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group, head in zip(meta.groups, meta.head):
            w_out, _, _ = unpack_head(head, group.dims)
            w_out.copy_(torch.randn(w_out.shape, generator=g, dtype=DT) * scale)


def three_step_loss(net, meta, theta=None):
    teacher = copy.deepcopy(net)
    teacher.heads.append(nn.Linear(4, 3).to(DT))
    with torch.no_grad():
        teacher.heads[1].weight.copy_(torch.linspace(-0.5, 0.5, 12, dtype=DT).view(3, 4))
        teacher.heads[1].bias.zero_()
    student = FunctionalStudent(copy.deepcopy(net), meta)
    student.load(teacher)
    ep = EpisodeState(teacher, student, meta.initial_state(dtype=DT), 1)
    losses = [inner_step(ep, batch(6, 2, 0, seed=10 + t), batch(6, 3, 0, seed=20 + t), lr=0.1, loss_scale=300.0,
                         theta=theta) for t in range(3)]
    return losses[-1], ep


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


def test_tbptt_meta_gradient_matches_central_finite_differences(monkeypatch):
    from fastl2r import ops
    net, meta = tiny_setup()
    randomise_head(meta)
    frozen = FrozenConstants(monkeypatch)
    with ops.use_backend("reference"):
        loss, _ = three_step_loss(net, meta)
        params = list(meta.parameters())
        grads = torch.autograd.grad(loss, params)
        g = torch.Generator().manual_seed(7)
        directions = [torch.randn(p.shape, generator=g, dtype=DT) for p in params]
        eps = 1e-6

        def loss_at(sign):
            with torch.no_grad():
                for p, d in zip(params, directions):
                    p.add_(sign * eps * d)
            frozen.replay()
            value, _ = three_step_loss(net, meta)
            with torch.no_grad():
                for p, d in zip(params, directions):
                    p.sub_(sign * eps * d)
            return value.item()

        fd = (loss_at(1) - loss_at(-1)) / (2 * eps)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, directions)).item()
    assert abs(analytic) > 1e-4
    assert abs(analytic - fd) / abs(fd) < 1e-5, (analytic, fd)
    assert all(gr.abs().sum() > 0 for gr in grads)  # every group's LSTM and head get gradient


def test_truncation_cuts_the_graph():
    net, meta = tiny_setup()
    randomise_head(meta)
    for truncate, reaches in ((False, True), (True, False)):
        teacher = copy.deepcopy(net)
        teacher.add_module("unused", nn.Identity())
        teacher.heads.append(nn.Linear(4, 3).to(DT))
        student = FunctionalStudent(copy.deepcopy(net), meta)
        student.load(teacher)
        ep = EpisodeState(teacher, student, meta.initial_state(dtype=DT), 1)
        first = meta.snapshot()
        inner_step(ep, batch(6, 2, 0, 1), batch(6, 3, 0, 2), lr=0.1, loss_scale=300.0, theta=first)
        if truncate:
            ep.student.truncate()
            ep.state = ep.state.detach()
        second = meta.snapshot()
        loss = inner_step(ep, batch(6, 2, 0, 3), batch(6, 3, 0, 4), lr=0.1, loss_scale=300.0, theta=second)
        earlier = torch.autograd.grad(loss, list(first.lstm) + list(first.head), allow_unused=True,
                                      retain_graph=True)
        later = torch.autograd.grad(loss, list(second.lstm) + list(second.head), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in later)
        assert any(g is not None and g.abs().sum() > 0 for g in earlier) == reaches


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


def small_experiment(data_root, run_dir=None, **overrides):
    from fastl2r.runner import Experiment
    items = ["arch=\"resnet8_gn\"", "pretrain.epochs=0.02", "metatrain.batch_size=8", "metatrain.episode_steps=3",
             "metatrain.episodes=4", "metatrain.save_every=1"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    config = build_config("exp1", "fmnist", "smoke", overrides=items)
    return Experiment(config, data_root=data_root, out_dir=run_dir, progress=False)


def test_threshold_restarts_the_episode(data_root):
    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.threshold": "[0.0, 5.0, 30.0]",
                                                         "metatrain.curriculum_every": 10}))
    record = trainer.run_episode(0)
    assert record.ended_by == "threshold" and record.steps == 1 and record.final_loss > 0


def test_horizon_and_truncation_run_the_whole_episode(data_root):
    # The threshold out of reach: this test is about the horizon, whatever the loss of w0.
    trainer = MetaTrainer(small_experiment(data_root, **{"metatrain.tbptt": "[2, 2, 9]",
                                                         "metatrain.threshold": "[1000.0, 1000.0, 1000.0]"}))
    record = trainer.run_episode(0)
    assert record.ended_by == "horizon" and record.steps == 3 and record.tbptt == 2


def test_nonfinite_loss_or_gradient_leaves_theta_unchanged(data_root, monkeypatch):
    trainer = MetaTrainer(small_experiment(data_root))
    before = [p.detach().clone() for p in trainer.meta.parameters()]
    first = next(trainer.meta.parameters())
    assert trainer.meta_update(first.sum() * float("nan")) is None
    infinite_gradient = torch.sqrt(first[0, 0] - first[0, 0].detach())  # value 0, gradient inf
    assert trainer.meta_update(infinite_gradient) is None

    import fastl2r.meta.training as training
    real = training.inner_step
    monkeypatch.setattr(training, "inner_step", lambda *a, **k: real(*a, **k) * float("nan"))
    record = trainer.run_episode(0)
    assert record.ended_by == "nonfinite" and trainer.progress.nonfinite == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.meta.parameters()))


def test_resume_continues_exactly(data_root, tmp_path):
    straight = MetaTrainer(small_experiment(data_root))
    straight.train(progress=False)
    run_dir = tmp_path / "run"
    first = MetaTrainer(small_experiment(data_root, run_dir), run_dir=run_dir)
    first.train(progress=False, stop_after=2)
    assert not (run_dir / "metalearner.pt").exists()
    resumed = MetaTrainer(small_experiment(data_root, run_dir), run_dir=run_dir)
    assert resumed.resume(run_dir) and resumed.progress.episode == 2
    resumed.train(progress=False)
    assert (run_dir / "metalearner.pt").exists()
    for a, b in zip(straight.meta.parameters(), resumed.meta.parameters()):
        assert torch.equal(a, b)
    assert [h["final_loss"] for h in straight.progress.history] == [h["final_loss"] for h in resumed.progress.history]
