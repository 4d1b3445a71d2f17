"""The forgetting measure: a linear readout fitted with full-batch Adam (DESIGN §1.5), on any
module and data (DESIGN §7.3)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fastl2r.data import load_dataset, make_task
from fastl2r.models import resnet14_gn
from torch.utils.data import DataLoader, TensorDataset

from fastl2r.readout import ReadoutSet, linear_readout


def test_separable_features_are_read_out_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=g) * 4
    labels = torch.arange(5).repeat(60)
    features = centres[labels] + 0.3 * torch.randn(300, 64, generator=g)
    assert linear_readout(features[:200], labels[:200], features[200:], labels[200:], 5) == 1.0


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1500, 64, generator=g)
    labels = torch.randint(0, 5, (1500,), generator=g)
    acc = linear_readout(features[:1000], labels[:1000], features[1000:], labels[1000:], 5)
    assert abs(acc - 0.2) < 0.07


@pytest.fixture(scope="module")
def fashion_mnist():
    try:
        return load_dataset("fashion_mnist", download=False, progress=False)
    except Exception as exc:  # the Debian package is what CI installs
        pytest.skip(f"Fashion-MNIST not available: {exc}")


def test_real_features_agree_with_scikit_learn(fashion_mnist):
    """64-d real features (8x8 average-pooled images) of 10 classes."""
    task = make_task(fashion_mnist, tuple(range(10)), max_train=3000, max_test=1000, seed=0)

    def pooled(images):
        return F.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1)

    xtr, ytr = pooled(task.train_images()), task.train_labels()
    xte, yte = pooled(task.test_images()), task.test_labels()
    ours = linear_readout(xtr, ytr, xte, yte, 10)
    sk = LogisticRegression(max_iter=2000).fit(xtr.numpy(), ytr.numpy()).score(xte.numpy(), yte.numpy())
    assert ours > 0.6
    assert abs(ours - sk) < 0.04, (ours, sk)


def test_readout_set_measures_any_module_and_its_head(fashion_mnist):
    task = make_task(fashion_mnist, (0, 1), max_train=200, max_test=200, seed=0)
    torch.manual_seed(0)
    model = resnet14_gn(1, [2])
    result = ReadoutSet(task, device="cpu", steps=100).evaluate(model, model.heads[0])
    assert 0.0 <= result.original <= 1.0
    assert result.readout > 0.8  # T-shirt vs trouser: separable even from random features
    assert ReadoutSet(task, device="cpu", steps=100).evaluate(model).original is None


def blobs(n, seed):
    """Three classes of 2x6x6 inputs, each with its own mean image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n)
    centres = torch.randn(3, 2, 6, 6, generator=torch.Generator().manual_seed(99))
    return centres[labels] + 0.5 * torch.randn(len(labels), 2, 6, 6, generator=g), labels


class ModeRecorder(nn.Module):
    """A conv net with BatchNorm that returns a [N, 4, 6, 6] map and records its mode at each call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return torch.relu(self.bn(self.conv(x)))


def test_any_module_on_datasets_loaders_or_tensors_with_pooled_maps():
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = blobs(40, 1), blobs(20, 2)
    model = ModeRecorder()
    model.bn.eval()  # a mixed mode, as with frozen BatchNorm, must come back as it was
    running_mean = model.bn.running_mean.clone()
    with torch.no_grad():
        model.eval()
        expected = linear_readout(model(xtr).mean((2, 3)), ytr, model(xte).mean((2, 3)), yte, 3, steps=100)
    model.train()
    model.bn.eval()
    model.modes.clear()
    for train, test in [((xtr, ytr), (xte, yte)),
                        (TensorDataset(xtr, ytr), DataLoader(TensorDataset(xte, yte), batch_size=7))]:
        assert ReadoutSet(train, test, steps=100, batch_size=16).evaluate(model).readout == expected
    assert expected > 0.6 and not any(model.modes)  # chance is 1/3; never in training mode
    assert model.training and not model.bn.training and model.conv.training
    assert torch.equal(model.bn.running_mean, running_mean)


def test_other_outputs_need_a_feature_function():
    data = blobs(10, 3)
    tokens = nn.Sequential(nn.Flatten(2), nn.Linear(36, 5))  # [N, 2, 5]: not a map, not vectors
    with pytest.raises(ValueError, match="pass features="):
        ReadoutSet(data, data, steps=5).evaluate(tokens)
    result = ReadoutSet(data, data, num_classes=4, steps=5).evaluate(tokens, features=lambda out: out.flatten(1))
    assert 0.0 <= result.readout <= 1.0


def test_a_task_holds_both_splits(fashion_mnist):
    task = make_task(fashion_mnist, (0, 1), max_train=20, max_test=20)
    with pytest.raises(TypeError, match="pass it alone"):
        ReadoutSet(task, task)


def plain_adam_readout(xtr, ytr, xte, yte, classes, steps, lr, seed):
    """One readout as the paper states it, written out: nn.Linear's default init from a seeded generator,
    full-batch Adam on the mean cross-entropy; returns the fitted layer and its test accuracy."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / xtr.shape[1] ** 0.5
    layer = nn.Linear(xtr.shape[1], classes).double()
    with torch.no_grad():
        layer.weight.copy_(torch.rand(classes, xtr.shape[1], generator=g) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(classes, generator=g) * 2 * bound - bound)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(layer(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return (layer(xte).argmax(1) == yte).double().mean().item()


@pytest.mark.parametrize("shapes", [[(40, 30, 3)], [(40, 30, 3), (25, 50, 5)], [(7, 9, 2), (60, 11, 4), (33, 33, 6)]])
def test_batched_readouts_equal_each_readout_fitted_alone(shapes):
    """Problems of other sizes and class counts, fitted as one: each gets the accuracy a plain nn.Linear + Adam
    of its own gets (float64, noisy blobs so that accuracies are not all 1)."""
    from fastl2r.readout import ReadoutProblem, linear_readouts

    g = torch.Generator().manual_seed(3)
    problems, expected = [], []
    for i, (n_train, n_test, classes) in enumerate(shapes):
        centres = torch.randn(classes, 16, generator=g, dtype=torch.float64)
        def sample(n):
            y = torch.randint(0, classes, (n,), generator=g)
            return centres[y] + 1.5 * torch.randn(n, 16, generator=g, dtype=torch.float64), y
        (xtr, ytr), (xte, yte) = sample(n_train), sample(n_test)
        problems.append(ReadoutProblem(xtr, ytr, xte, yte, classes, seed=10 + i))
        expected.append(plain_adam_readout(xtr, ytr, xte, yte, classes, 60, 0.1, 10 + i))
    assert linear_readouts(problems, steps=60, lr=0.1) == pytest.approx(expected, abs=1e-12)
    assert min(expected) < 1  # some layer is not perfect: an error anywhere would show


def test_a_meta_test_evaluation_fits_its_readouts_at_once(fashion_mnist):
    from fastl2r.readout import evaluate_readouts

    model = resnet14_gn(1, [2])
    sets = [ReadoutSet(make_task(fashion_mnist, classes, max_train=30, max_test=20), steps=20)
            for classes in ((0, 1), (2, 3, 4))]
    together = evaluate_readouts([(s, model, model.heads[0] if i == 0 else None)
                                  for i, s in enumerate(sets)])
    alone = [sets[0].evaluate(model, model.heads[0]), sets[1].evaluate(model)]
    assert [r.original for r in together] == [r.original for r in alone] and together[1].original is None
    assert [r.readout for r in together] == pytest.approx([r.readout for r in alone], abs=1e-6)


def test_readouts_of_other_feature_widths_are_fitted_apart():
    """A method whose tasks' representations differ in width still reads every task out in one call."""
    from fastl2r.readout import evaluate_readouts

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(40, 1, 8, 8, generator=g), torch.arange(2).repeat(20)
    narrow = nn.Sequential(nn.Conv2d(1, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    wide = nn.Sequential(nn.Conv2d(1, 7, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    sets = [ReadoutSet((x[:30], y[:30]), (x[30:], y[30:]), steps=10) for _ in range(2)]
    together = evaluate_readouts([(sets[0], narrow, None), (sets[1], wide, None)])
    alone = [sets[0].evaluate(narrow), sets[1].evaluate(wide)]
    assert [r.readout for r in together] == pytest.approx([r.readout for r in alone], abs=1e-6)
