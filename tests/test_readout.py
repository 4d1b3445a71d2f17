"""The forgetting measure: a linear readout fitted with full-batch Adam (DESIGN §1.5)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fastl2r.data import load_dataset, make_task
from fastl2r.models import resnet14_gn
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
    result = ReadoutSet(task, "cpu", steps=100).evaluate(model, model.heads[0])
    assert 0.0 <= result.original <= 1.0
    assert result.readout > 0.8  # T-shirt vs trouser: separable even from random features
    assert ReadoutSet(task, "cpu", steps=100).evaluate(model).original is None
