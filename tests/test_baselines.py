"""The baselines LwF, EWC, HAT, MAML and Rep against hand computations and plain autograd."""
import copy
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastl2r.baselines.ewc import QuadraticPenalty, ewc_penalty, fisher_diagonal, sampled_labels
from fastl2r.baselines.hat import HATNetwork, TaskAttention, annealed_scale, sparsity
from fastl2r.baselines.lwf import LwFLearner, distillation
from fastl2r.baselines.maml import adapted_head, query_loss
from fastl2r.baselines.rep import Rep, representation_tasks
from fastl2r import train
from fastl2r.data import Batch
from fastl2r.errors import UserError
from fastl2r.experiments import build_config
from fastl2r.metatest import run_tasks
from fastl2r.models import resnet8_gn
from fastl2r.workspace import Workspace
from fastl2r.train import main


class TinyNet(nn.Module):
    """conv → GroupNorm → ReLU → mean: a 4-d representation, and one head per task."""

    def __init__(self, heads=(3, 2)):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.heads = nn.ModuleList(nn.Linear(4, n) for n in heads)

    def forward(self, x):
        return F.relu(self.gn(self.conv(x))).mean(dim=(2, 3))


def tiny(seed=0, heads=(3, 2)):
    torch.manual_seed(seed)
    return TinyNet(heads).double()


# ----- EWC -----

def test_fisher_is_the_mean_of_squared_per_example_gradients():
    model = tiny()
    x = torch.randn(7, 1, 5, 5, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    fisher = fisher_diagonal(model, 0, x, labels, chunk_size=3)  # chunks of 3, 3, 1
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for n in range(7):  # one example at a time, plain autograd
        model.zero_grad()
        F.log_softmax(model.heads[0](model(x[n:n + 1])), 1)[0, labels[n]].backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                expected[name] += p.grad.pow(2) / 7
    assert set(fisher) == {"conv.weight", "conv.bias", "gn.weight", "gn.bias", "heads.0.weight", "heads.0.bias"}
    for name, f in fisher.items():
        torch.testing.assert_close(f, expected[name], rtol=1e-10, atol=1e-14)
    assert all(f.abs().sum() > 0 for f in fisher.values())


def test_fisher_labels_are_drawn_from_the_predictive_distribution():
    model = tiny()
    probs = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    with torch.no_grad():
        model.heads[0].weight.zero_()
        model.heads[0].bias.copy_(probs.log())
    x = torch.randn(20000, 1, 3, 3, dtype=torch.float64)
    labels = sampled_labels(model, 0, x, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)  # ~4.5 standard errors


def test_ewc_penalty_and_its_gradient_match_hand_computed_values():
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([1.0, 2.0, -1.0]))
    model.v = nn.Parameter(torch.tensor([3.0]))
    first = QuadraticPenalty({"w": torch.tensor([2.0, 3.0, 0.5])}, {"w": torch.tensor([0.5, 2.0, 0.0])})
    second = QuadraticPenalty({"w": torch.tensor([1.0, 1.0, 1.0]), "v": torch.tensor([2.0])},
                              {"w": torch.tensor([1.0, 1.0, 1.0]), "v": torch.tensor([1.0])})
    # λ/2 · Σ F (w − w*)²: first task 2·(2·0.25 + 0 + 0.5·1) = 2; second 2·(0 + 1 + 4 + 2·4) = 26
    penalty = ewc_penalty(model, [first], lam=4.0)
    assert penalty.item() == pytest.approx(2.0)
    penalty.backward()
    torch.testing.assert_close(model.w.grad, torch.tensor([4.0, 0.0, -2.0]))  # λ F (w − w*)
    model.w.grad = None
    both = ewc_penalty(model, [first, second], lam=4.0)  # Experiment 5: the terms add up
    assert both.item() == pytest.approx(28.0)
    both.backward()
    torch.testing.assert_close(model.w.grad, torch.tensor([4.0, 4.0, -10.0]))
    torch.testing.assert_close(model.v.grad, torch.tensor([16.0]))


# ----- LwF -----

def hand_kl(logits, old_logits, t):
    p_old, log_p_old = F.softmax(old_logits / t, 1), F.log_softmax(old_logits / t, 1)
    return (p_old * (log_p_old - F.log_softmax(logits / t, 1))).sum(1).mean()


def test_distillation_value_and_gradient_match_a_hand_written_kl():
    torch.manual_seed(0)
    old = torch.randn(6, 5, dtype=torch.float64)
    same = old.clone().requires_grad_()
    d0 = distillation(same, old, 2.0)
    d0.backward()
    assert d0.item() == pytest.approx(0.0, abs=1e-12)  # step 0: current outputs = old outputs
    torch.testing.assert_close(same.grad, torch.zeros_like(old), atol=1e-12, rtol=0)
    moved = (old + torch.randn_like(old)).requires_grad_()
    d = distillation(moved, old, 2.0)
    d.backward()
    assert d.item() == pytest.approx(hand_kl(moved.detach(), old, 2.0).item(), rel=1e-10)
    # ∂/∂z of the batch-mean KL at temperature T: (softmax(z/T) − softmax(z_old/T)) / (T · B)
    expected = (F.softmax(moved.detach() / 2, 1) - F.softmax(old / 2, 1)) / (2 * 6)
    torch.testing.assert_close(moved.grad, expected, rtol=1e-10, atol=1e-14)


def test_lwf_loss_starts_as_the_new_task_cross_entropy_and_then_distils():
    model = tiny(heads=(3,))
    learner = LwFLearner(model, lr=0.5, alpha=1.0, temperature=2.0)
    model.heads.append(nn.Linear(4, 2).double())
    learner.begin_task(1, task=None)
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    batch = Batch(x, torch.tensor([0, 1, 1, 0, 1]), torch.zeros(5, dtype=torch.long))
    ce = F.cross_entropy(model.heads[1](model(x)), batch.y)
    assert learner.loss(batch, None).item() == pytest.approx(ce.item(), rel=1e-12)
    old_logits = model.heads[0](model(x)).detach()
    learner.step(batch, None)
    learner.step(batch, None)
    h = model(x)
    expected = F.cross_entropy(model.heads[1](h), batch.y) + hand_kl(model.heads[0](h), old_logits, 2.0)
    assert learner.loss(batch, None).item() == pytest.approx(expected.item(), rel=1e-10)


# ----- HAT -----

def hat_network(seed=0):
    torch.manual_seed(seed)
    return HATNetwork(resnet8_gn(1, [3]))


def test_hat_gates_are_binary_when_s_is_large():
    net = hat_network()
    with torch.no_grad():
        e = net.embeddings[0]
        e.copy_(torch.where(e.abs() < 0.1, torch.full_like(e, 0.1), e))  # σ(s·e) is 1/2 at e = 0
    gates = net.gates(0, 1e4)
    assert ((gates == 0) | (gates == 1)).all() and 0 < gates.mean() < 1
    soft = net.gates(0, 3.0)
    assert ((soft > 0) & (soft < 1)).any()


def test_hat_sparsity_regulariser_matches_a_hand_computation():
    gates = torch.tensor([0.2, 0.9, 0.5])
    # first task: Σ a / n;  then Σ a (1 − a_<t) / Σ (1 − a_<t) = (0.2 + 0 + 0.25) / 1.5
    assert sparsity(gates, None).item() == pytest.approx(1.6 / 3)
    assert sparsity(gates, torch.tensor([0.0, 1.0, 0.5])).item() == pytest.approx(0.3)


def test_hat_annealing_goes_from_one_over_s_max_to_s_max_each_period():
    assert annealed_scale(0, 5, 3.0) == pytest.approx(1 / 3)
    assert annealed_scale(4, 5, 3.0) == pytest.approx(3.0)
    assert annealed_scale(2, 5, 3.0) == pytest.approx((1 / 3 + 3) / 2)
    assert annealed_scale(5, 5, 3.0) == pytest.approx(1 / 3)  # the next epoch starts again
    assert annealed_scale(0, 1, 3.0) == 3.0


def test_hat_conditioning_zeroes_the_gradient_of_units_task_a_uses():
    net = hat_network()
    units = dict(zip(net.layers, range(len(net.layers))))
    offsets = [0]
    for n in net.units:
        offsets.append(offsets[-1] + n)
    with torch.no_grad():  # Task A uses stem unit 3 and units 1, 2 of blocks.0.gn1 and unit 5 of blocks.0.gn2
        e = net.embeddings[0]
        e.fill_(-6.0)
        for layer, unit in (("gn", 3), ("blocks.0.gn1", 1), ("blocks.0.gn1", 2), ("blocks.0.gn2", 5)):
            e[offsets[units[layer]] + unit] = 6.0
    used = net.cumulative_gates(1, 3.0)
    assert ((used < 1e-6) | (used > 1 - 1e-6)).all() and (used > 0.5).sum() == 4
    net.add_head(2)
    attention = TaskAttention(net, 1, s_max=3.0, c=0.75, embedding_clamp=6.0, period=4)
    # hand-checked factors: 1 − min(a_out, a_in); the stem's input (the image) counts as used
    stem = attention.factors["backbone.conv.weight"][:, 0, 0, 0]
    assert stem[3].item() == pytest.approx(0.0, abs=1e-7) and stem[0].item() == pytest.approx(1.0, abs=1e-7)
    conv2 = attention.factors["backbone.blocks.0.conv2.weight"][:, :, 0, 0]
    assert conv2[5, 1].item() == pytest.approx(0.0, abs=1e-7)   # used → used
    assert conv2[5, 0].item() == pytest.approx(1.0, abs=1e-7)   # free input → used output
    assert conv2[4, 1].item() == pytest.approx(1.0, abs=1e-7)   # used input → free output
    before = copy.deepcopy(net.state_dict())
    torch.manual_seed(1)
    batch = Batch(torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 0, 1, 1, 0]), torch.zeros(6, dtype=torch.long))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    attention.step(batch, optimizer)
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert grads["backbone.conv.weight"][3].abs().max() < 1e-7
    assert grads["backbone.conv.weight"][[0, 1, 2]].abs().sum() > 0
    for name in ("backbone.gn.weight", "backbone.gn.bias"):
        assert grads[name][3].abs() < 1e-7 and grads[name][[0, 1, 2]].abs().sum() > 0
    assert grads["backbone.blocks.0.conv2.weight"][5, 1:3].abs().max() < 1e-7
    assert grads["backbone.blocks.0.conv2.weight"][5, 0].abs().sum() > 0
    after = net.state_dict()
    torch.testing.assert_close(after["backbone.conv.weight"][3], before["backbone.conv.weight"][3], atol=1e-8, rtol=0)
    assert not torch.equal(after["backbone.conv.weight"][0], before["backbone.conv.weight"][0])
    torch.testing.assert_close(after["embeddings.0"], before["embeddings.0"])  # old tasks' embeddings stay


def test_hat_embedding_gradient_is_compensated_for_the_annealing():
    net = hat_network()
    net.add_head(2)
    attention = TaskAttention(net, 1, s_max=3.0, c=0.75, embedding_clamp=6.0, period=10)
    batch = Batch(torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 1, 0]), torch.zeros(4, dtype=torch.long))
    s = 0.7
    e = net.embeddings[1]
    raw, = torch.autograd.grad(attention.loss(batch, s), e)
    attention.loss(batch, s).backward()
    attention.adjust_gradients(s)
    e = e.detach()
    factor = 3.0 / s * (torch.cosh(s * e) + 1) / (torch.cosh(e) + 1)
    torch.testing.assert_close(net.embeddings[1].grad, raw * factor)


# ----- MAML -----

def hand_unrolled_query_loss(backbone, support, query, classes, steps, lr):
    """The inner loop written out with the softmax cross-entropy gradient formula, no autograd.grad."""
    h = backbone(torch.cat([support.x, query.x]))
    hs, hq = h[:len(support.y)], h[len(support.y):]
    weight = hs.new_zeros(classes, hs.shape[1])
    bias = hs.new_zeros(classes)
    onehot = F.one_hot(support.y, classes).to(hs.dtype)
    for _ in range(steps):
        residual = (F.softmax(hs @ weight.T + bias, 1) - onehot) / len(support.y)
        weight, bias = weight - lr * residual.T @ hs, bias - lr * residual.sum(0)
    return F.cross_entropy(hq @ weight.T + bias, query.y)


def tiny_maml_case(seed=0):
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(5, 4), nn.Tanh()).double()
    support = Batch(torch.randn(8, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), None)
    query = Batch(torch.randn(6, 5, dtype=torch.float64), torch.tensor([2, 1, 0, 0, 2, 1]), None)
    return backbone, support, query


def test_maml_outer_gradient_is_second_order_through_the_unrolled_head():
    backbone, support, query = tiny_maml_case()
    params = list(backbone.parameters())
    got = torch.autograd.grad(query_loss(backbone, support, query, 3, steps=4, lr=0.7), params)
    expected = torch.autograd.grad(hand_unrolled_query_loss(backbone, support, query, 3, 4, 0.7), params)
    for g, e in zip(got, expected):
        assert g.abs().sum() > 0
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    # the second-order term matters: a first-order head (support features detached) differs
    h = backbone(torch.cat([support.x, query.x]))
    weight, bias = adapted_head(h[:8].detach(), support.y, 3, 4, 0.7)
    first_order = torch.autograd.grad(F.cross_entropy(F.linear(h[8:], weight, bias), query.y), params)
    assert max((g - f).abs().max().item() for g, f in zip(got, first_order)) > 1e-4


def test_maml_adapted_head_is_sgd_on_the_support_set():
    _, support, _ = tiny_maml_case()
    features = torch.randn(8, 4, dtype=torch.float64)
    weight, bias = adapted_head(features, support.y, 3, steps=2, lr=0.5)
    layer = nn.Linear(4, 3).double()
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    sgd = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        sgd.zero_grad()
        F.cross_entropy(layer(features), support.y).backward()
        sgd.step()
    torch.testing.assert_close(weight.detach(), layer.weight.detach())
    torch.testing.assert_close(bias.detach(), layer.bias.detach())


def test_maml_outer_gradient_reaches_every_backbone_layer_of_a_resnet():
    torch.manual_seed(0)
    model = resnet8_gn(1, [3])
    support = Batch(torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1]), None)
    query = Batch(torch.randn(4, 1, 32, 32), torch.tensor([1, 0, 1, 0]), None)
    query_loss(model, support, query, 2, steps=10, lr=0.1).backward()
    for name, p in model.named_parameters():
        if name.startswith("heads."):
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----- Rep -----

def fmnist_experiment(experiment, tmp_path, *overrides):
    config = build_config(experiment, "fmnist", "smoke", overrides=list(overrides))
    return Workspace(config, data_root=tmp_path, progress=False)


@pytest.mark.parametrize("experiment,source,meta_train", [
    ("exp1", range(5), range(5, 10)), ("exp2", range(4), (4, 5, 6)), ("exp5", (0, 1), (2, 3, 4, 5))])
def test_rep_trains_on_task_a_and_the_meta_training_classes_only(tmp_path, experiment, source, meta_train):
    exp = fmnist_experiment(experiment, tmp_path)
    tasks = representation_tasks(exp)
    assert [t.classes for t in tasks] == [tuple(source), tuple(meta_train)]
    meta_test = run_tasks(exp, 0)[1:]
    for test_task in meta_test:
        seen = set(tasks[1].train_index.tolist())
        assert not seen & set(test_task.train.train_index.tolist())  # exp1: the other half of the images
        if experiment != "exp1":
            assert not set(test_task.train.classes) & (set(source) | set(meta_train))


def test_rep_pretrains_on_the_shifted_images_of_a_shifted_suite(tmp_path):
    exp = Workspace(build_config("exp1", "fmnist_inverted", "smoke"), data_root=tmp_path, progress=False)
    source, meta_train = representation_tasks(exp)
    assert source.name == "fashion_mnist[0,2,3,4,6]"
    assert meta_train.name == "fashion_mnist+invert[1,5,7,8,9](first half)"
    plain = exp.task({"dataset": "fashion_mnist", "train_part": "first_half"}, (1, 5, 7, 8, 9))
    assert torch.equal(meta_train.train_images(), 255 - plain.train_images())


def test_rep_pretraining_sees_exactly_those_tasks(tmp_path, monkeypatch):
    import fastl2r.baselines.rep as rep

    seen = []

    def spy(model, tasks, **kwargs):
        seen.append((tuple(t.name for t in tasks), len(model.heads), kwargs["steps"]))

    monkeypatch.setattr(rep, "train_supervised", spy)
    monkeypatch.setattr(rep, "head_accuracy", lambda *args: 0.0)
    exp = fmnist_experiment("exp2", tmp_path, "arch=\"resnet8_gn\"", "rep.epochs=0.5")
    method = Rep(exp, exp.config["methods"]["rep"])
    method.prepare()
    names = tuple(t.name for t in representation_tasks(exp))
    assert seen == [(names, 2, math.ceil(0.5 * (4 * 6000 + 3 * 6000) / 64))]
    model = method.initial_model(0)
    assert len(model.heads) == 1 and model.heads[0].out_features == 4  # Task A's head only
    assert method.info()["pretraining"]["tasks"] == list(names)


# ----- configuration -----

def test_a_method_override_lands_in_config_json_and_an_unknown_key_exits_2(tmp_path, monkeypatch, capsys):
    def stop(*args):
        raise UserError("stopped once config.json is written")

    monkeypatch.setenv("FASTL2R_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(train, "check_inputs", lambda *args: None)  # no data here: nothing is read
    monkeypatch.setattr(train, "run_metatest", stop)
    main(["exp2", "--preset", "smoke", "--methods", "ewc", "--set", "ewc.lambda=10", "--set", "maml.inner_steps=3",
          "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["methods"]["ewc"]["lambda"] == 10.0 and config["methods"]["maml"]["inner_steps"] == 3
    capsys.readouterr()
    assert main(["exp2", "--set", "ewc.lamda=10", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown key 'ewc.lamda'" in err and "methods.ewc.lambda" in err and "methods.hat.s_max" in err
    assert not (tmp_path / "bad").exists()


def test_every_method_option_can_be_overridden_by_its_dotted_name():
    config = build_config("exp1", "fmnist", "smoke", overrides=[
        "sgd_x0.1.lr=0.02", "methods.hat.s_max=400", "maml.meta_iterations=7", "rep.epochs=1"])
    assert config["methods"]["sgd_x0.1"]["lr"] == 0.02 and config["methods"]["hat"]["s_max"] == 400.0
    assert config["methods"]["maml"]["meta_iterations"] == 7 and config["methods"]["rep"]["epochs"] == 1.0


@pytest.mark.parametrize("delta", [0.25, -0.5])
def test_sgd_mean_delta_takes_the_learned_rules_mean_multiplier(tmp_path, delta):
    """A rule whose δ is constant (zero output weights, s = δ / tanh(b)) has that mean δ, so the
    control's learning rate is SGD's times it — measured on a meta-training task."""
    from fastl2r.meta import MetaLearner, save_metalearner
    from fastl2r.methods import method_class
    from fastl2r.ops import unpack_head

    ws = fmnist_experiment("exp2", tmp_path, "metatest.steps_per_task=3")
    meta = MetaLearner(ws.new_model())
    with torch.no_grad():
        for group, head in zip(meta.groups, meta.head):
            w_out, b_out, scale = unpack_head(head, group.dims)
            w_out.zero_()
            scale.copy_(delta / torch.tanh(b_out[:, 0]))
    path = save_metalearner(meta, tmp_path / "rule.pt")
    method = method_class("sgd_mean_delta")(ws, {"lr": 0.1, "metalearner": str(path)})
    method.prepare()
    assert method.info()["mean_delta"] == pytest.approx(delta, rel=1e-6)
    assert method.lr == pytest.approx(0.1 * delta, rel=1e-6)
    missing = method_class("sgd_mean_delta")(ws, {"lr": 0.1, "metalearner": ""})
    with pytest.raises(UserError, match="needs a trained meta-learner"):
        missing.prepare()
