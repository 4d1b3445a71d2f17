"""LearnedOptimizer as a torch.optim.Optimizer, against torch.optim.SGD where they must coincide
(a fresh meta-learner has δ ≡ 1), and save/load of meta-learners."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastl2r.errors import UserError
from fastl2r.meta import LearnedOptimizer, MetaLearner, load_metalearner, save_metalearner
from fastl2r.models import resnet8_gn, resnet14_gn
from fastl2r.ops import unpack_head


class SmallNet(nn.Module):
    """Gated tensors (conv weights, GroupNorm γ/β, a hidden linear weight) and ungated ones
    (conv and linear biases, BatchNorm γ/β, the heads)."""

    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.fc = nn.Linear(8, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 3)])

    def forward(self, x):
        x = F.relu(self.gn(self.conv1(x)))
        x = F.relu(self.bn(self.conv2(x))).mean((2, 3))
        return F.relu(self.fc(x))


def data(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def loss_of(model, x, y):
    return F.cross_entropy(model.heads[0](model(x)), y)


def trained_meta(model, seed=1):
    """A meta-learner whose δ is not 1 (random output weights), so its LSTM states matter."""
    meta = MetaLearner(model, conv_hidden=6, norm_hidden=3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group, head in zip(meta.groups, meta.head):
            w_out, _, _ = unpack_head(head, group.dims)
            w_out.copy_(0.3 * torch.randn(w_out.shape, generator=g))
    return meta


def quiet_optimizer(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LearnedOptimizer(*args, **kwargs)


def groups_of(model, backbone_lr, head_lr):
    backbone = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    return [{"params": backbone, "lr": backbone_lr}, {"params": model.heads.parameters(), "lr": head_lr}]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_fresh_meta_learner_is_sgd_with_param_groups_scheduler_and_closure(set_to_none):
    torch.manual_seed(0)
    model = SmallNet()
    reference = copy.deepcopy(model)
    ours = quiet_optimizer(model, MetaLearner(model), groups_of(model, 0.05, 0.2))
    sgd = torch.optim.SGD(groups_of(reference, 0.05, 0.2), lr=0.1)
    schedulers = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) for opt in (ours, sgd)]
    for x, y in data(5):
        losses = []
        for net, opt in ((model, ours), (reference, sgd)):
            def closure(net=net, opt=opt):
                opt.zero_grad(set_to_none=set_to_none)
                loss = loss_of(net, x, y)
                loss.backward()
                return loss
            losses.append(opt.step(closure))
        for scheduler in schedulers:
            scheduler.step()
        assert torch.equal(losses[0], losses[1])
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(p, q), name
    assert ours.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 ** 2)
    ours.zero_grad(set_to_none=set_to_none)
    sgd.zero_grad(set_to_none=set_to_none)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None) == set_to_none
        assert set_to_none or not p.grad.any()


def test_only_parameters_with_a_gradient_move():
    torch.manual_seed(0)
    model = SmallNet(batch_norm=False)
    before = copy.deepcopy(model)
    optimizer = quiet_optimizer(model, trained_meta(model))
    model.conv2.weight.requires_grad_(False)  # frozen: no gradient, no move, no state
    x, y = data(1)[0]
    loss_of(model, x, y).backward()
    optimizer.step()
    assert torch.equal(model.conv2.weight, before.conv2.weight)
    assert model.conv2.weight not in optimizer.state
    assert not torch.equal(model.conv1.weight, before.conv1.weight) and model.conv1.weight in optimizer.state


def run_loop(model, optimizer, batches):
    for x, y in batches:
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()


def test_state_dict_round_trip_resumes_the_loop_exactly(tmp_path):
    torch.manual_seed(0)
    model = SmallNet(batch_norm=False)
    meta = trained_meta(model)
    optimizer = quiet_optimizer(model, meta)
    batches = data(6)
    run_loop(model, optimizer, batches[:3])
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    run_loop(model, optimizer, batches[3:])  # the uninterrupted loop

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, fresh = SmallNet(batch_norm=False), SmallNet(batch_norm=False)
    for net in (resumed, fresh):
        net.load_state_dict(saved["model"])
    resumed_opt = quiet_optimizer(resumed, meta)
    resumed_opt.load_state_dict(saved["optimizer"])
    run_loop(resumed, resumed_opt, batches[3:])
    run_loop(fresh, quiet_optimizer(fresh, meta), batches[3:])  # LSTM states restarted from zero
    state = optimizer.state[model.conv1.weight]
    assert state["h"].shape == (3, 4, 6) and state["h"].abs().sum() > 0
    for (name, p), q, r in zip(model.named_parameters(), resumed.parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.conv1.weight, fresh.conv1.weight)  # so the states did matter


def test_lstm_states_keep_the_meta_learners_dtype_through_load_state_dict():
    torch.manual_seed(0)
    model = SmallNet(batch_norm=False).double()
    optimizer = quiet_optimizer(model, trained_meta(model))  # a float32 meta-learner, a float64 model
    run_loop(model, optimizer, [(x.double(), y) for x, y in data(2)])
    again = quiet_optimizer(model, optimizer.meta)
    again.load_state_dict(optimizer.state_dict())
    assert again.state[model.conv1.weight]["h"].dtype == torch.float32
    assert torch.equal(again.state[model.conv1.weight]["h"], optimizer.state[model.conv1.weight]["h"])


def test_compiled_model_updates_like_the_eager_one():
    torch.manual_seed(0)
    model = SmallNet(batch_norm=False)
    eager, initial = copy.deepcopy(model), copy.deepcopy(model)
    meta = trained_meta(model)
    compiled = torch.compile(model, backend="eager")
    assert next(iter(dict(compiled.named_parameters()))).startswith("_orig_mod.")
    optimizer = quiet_optimizer(compiled, meta)
    batches = data(3)
    run_loop(compiled, optimizer, batches)
    run_loop(eager, quiet_optimizer(eager, meta), batches)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(model.conv1.weight, initial.conv1.weight)


def test_a_compiled_model_first_run_without_the_hooks_gets_a_clear_error():
    model = SmallNet(batch_norm=False)
    compiled = torch.compile(model, backend="eager")
    x, y = data(1)[0]
    compiled(x)  # compiled before the optimizer's hooks existed
    optimizer = quiet_optimizer(compiled, MetaLearner(model))
    loss_of(compiled, x, y).backward()
    with pytest.raises(RuntimeError, match="create the LearnedOptimizer before"):
        optimizer.step()


def test_autocast_bf16_on_cpu():
    torch.manual_seed(0)
    model = SmallNet(batch_norm=False)
    reference = copy.deepcopy(model)
    ours, sgd = quiet_optimizer(model, MetaLearner(model)), torch.optim.SGD(reference.parameters(), lr=0.1)
    for x, y in data(2):
        for net, opt in ((model, ours), (reference, sgd)):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_of(net, x, y)
            loss.backward()
            opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name  # δ ≡ 1 also when the activations are bfloat16

    trained = quiet_optimizer(model, trained_meta(model))
    x, y = data(1, seed=3)[0]
    recorded = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: recorded.__setitem__(k, (i[0], o)))
             for k, m in (("conv1", model.conv1), ("gn", model.gn), ("conv2", model.conv2), ("fc", model.fc))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, x, y)
    loss.backward()
    for hook in hooks:
        hook.remove()
    assert {a.dtype for pair in recorded.values() for a in pair} == {torch.float32, torch.bfloat16}
    means = torch.cat([a.float().mean([d for d in range(a.dim()) if d != 1])
                       for k in ("conv1", "gn", "conv2", "fc") for a in recorded[k]])
    params = dict(model.named_parameters())
    grads = {n: p.grad for n, p in params.items()}
    _, state, deltas = trained.meta.step(trained.meta.flatten(params), trained.meta.flatten(grads), means,
                                         trained.meta.initial_state())
    trained.step()
    assert trained.state[model.conv1.weight]["h"].dtype == torch.float32
    for got, expected in zip(trained.last_deltas, deltas):
        torch.testing.assert_close(got, expected)


def test_ungated_parameters_are_listed_once_with_what_they_get():
    model = SmallNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LearnedOptimizer(model, MetaLearner(model))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "plain SGD" in message
    for expected in ("BatchNorm2d: bn.weight, bn.bias", "Conv2d bias: conv1.bias", "Linear bias: fc.bias",
                     "head: heads.0.weight, heads.0.bias"):
        assert expected in message, message
    resnet = resnet8_gn(1, [2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # heads alone get plain SGD by design: no warning
        LearnedOptimizer(resnet, MetaLearner(resnet))


def test_parameters_of_another_model_are_refused():
    model = SmallNet()
    optimizer = quiet_optimizer(model, MetaLearner(model))
    with pytest.raises(ValueError, match="not the model's"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    assert len(optimizer.param_groups) == 1


def test_save_and_load_with_one_call_each(tmp_path):
    model = SmallNet(batch_norm=False)
    meta = trained_meta(model)
    path = save_metalearner(meta, tmp_path / "metalearner.pt")
    loaded = load_metalearner(path, SmallNet(batch_norm=False))
    assert (loaded.lr, loaded.conv_hidden, loaded.norm_hidden) == (meta.lr, 6, 3)
    for (name, p), q in zip(meta.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name
    assert load_metalearner(path, model, lr=0.05).lr == 0.05


def test_loading_for_another_architecture_names_both(tmp_path):
    path = save_metalearner(MetaLearner(resnet14_gn(1, [5])), tmp_path / "metalearner.pt")
    with pytest.raises(UserError) as error:
        load_metalearner(path, resnet8_gn(1, [5]))
    message = str(error.value)
    assert "trained for resnet14_gn" in message and "the model is resnet8_gn" in message
    with pytest.raises(UserError, match=r"first difference: conv.weight \[16, 1, 3, 3\] there, conv.weight "
                                        r"\[16, 3, 3, 3\] here"):
        load_metalearner(path, resnet14_gn(3, [5]))


def test_the_shipped_headline_rule_fits_the_cpu_preset_and_is_trained():
    """fastl2r/trained/exp1-fmnist_inverted-cpu.pt is the README's headline rule: trained with the cpu
    preset's configuration, it loads for that preset's network, and it is not a fresh meta-learner
    (whose δ ≡ 1 makes its step plain SGD's)."""
    from pathlib import Path

    from fastl2r.experiments import build_config, computation_changes

    path = Path(__file__).resolve().parents[1] / "fastl2r" / "trained" / "exp1-fmnist_inverted-cpu.pt"
    config = build_config("exp1", "fmnist_inverted", "cpu")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert computation_changes(saved["config"], config) == [] and saved["config"]["metatrain"]["episodes"] == 47
    torch.manual_seed(0)
    model = resnet8_gn(1, [5])
    meta = load_metalearner(path, model, arch=config["arch"])
    sgd_model = copy.deepcopy(model)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, 5, (16,))
    for net, optimizer in ((model, LearnedOptimizer(model, meta)), (sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=0.1))):
        F.cross_entropy(net.heads[0](net(x)), y).backward()
        optimizer.step()
    moved = [(p - q).abs().max().item() for p, q in zip(model.conv.parameters(), sgd_model.conv.parameters())]
    assert max(moved) > 1e-6
