"""The forgetting measure (DESIGN §1.5): a linear readout retrained on a network's representation.

``linear_readout`` fits a fresh ``Linear(dim, classes)`` from scratch on training
features with full-batch Adam and reports test accuracy.  ``ReadoutSet`` holds the data of
a readout — a fastl2r ``Task`` (both its splits), or for each split a ``Dataset`` or
``DataLoader`` of ``(input, label)`` pairs or an ``(inputs, labels)`` pair of tensors — so
that measuring any ``nn.Module`` is one call: ``ReadoutSet(train, test).evaluate(model)``.

The module runs in eval mode, without gradients, and gets its own modes back afterwards.  Its
output is the representation: ``[N, D]`` as it is, a feature map ``[N, C, H, W]`` averaged over
``H, W`` to ``[N, C]``; for any other output pass ``features``, a function from the module's
output to ``[N, D]`` (e.g. ``lambda out: out.flatten(1)``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data import Task, to_float
from .profiling import nvtx_range

READOUT_STEPS = 500
READOUT_LR = 0.1
BATCH_SIZE = 1000

ReadoutData = Union[Dataset, DataLoader, "tuple[torch.Tensor, torch.Tensor]"]
Batches = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def linear_readout(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, num_classes: int, *, steps: int = READOUT_STEPS,
                   lr: float = READOUT_LR, seed: int = 0) -> float:
    """Test accuracy (a fraction) of a linear layer fitted with ``steps`` full-batch Adam steps."""
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("linear_readout needs at least one training and one test example")
    generator = torch.Generator().manual_seed(seed)
    dim = train_features.shape[1]
    layer = nn.Linear(dim, num_classes)
    bound = 1.0 / dim ** 0.5  # nn.Linear's default init, drawn from our own generator
    with torch.no_grad():
        layer.weight.copy_(torch.rand(num_classes, dim, generator=generator) * 2 * bound - bound)
        layer.bias.copy_(torch.rand(num_classes, generator=generator) * 2 * bound - bound)
    layer = layer.to(device=train_features.device, dtype=train_features.dtype)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    x, y = train_features.detach(), train_labels
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(layer(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        return accuracy(layer(test_features), test_labels)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of examples whose largest logit is their label: the accuracy of readouts and original
    heads alike."""
    return (logits.argmax(dim=1) == labels).float().mean().item()


@contextmanager
def eval_mode(model: Callable) -> Iterator[None]:
    """``model`` (if a module) in eval mode inside the block; every submodule's own mode after it."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    for module, _ in modes:
        module.training = False
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def as_vectors(output, features: Optional[Callable] = None) -> torch.Tensor:
    """The representation ``[N, D]`` in a module's ``output`` (see the module's docstring)."""
    h = features(output) if features is not None else output
    if isinstance(h, torch.Tensor) and h.dim() == 4:
        h = h.mean(dim=(2, 3))
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        shape = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
        raise ValueError(f"the representation is {shape}: a readout fits [N, D] vectors and pools [N, C, H, W] "
                         "maps over H, W; pass features=, a function from the module's output to [N, D] "
                         "(e.g. features=lambda out: out.flatten(1))")
    return h


def _tensor_batches(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int,
                    prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> Batches:
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    return lambda: ((prepare(inputs[i:i + batch_size]), labels[i:i + batch_size])
                    for i in range(0, inputs.shape[0], batch_size))


def _batches(data: ReadoutData, batch_size: int, device: Optional[torch.device]) -> Batches:
    """``(inputs, labels)`` batches of one split, afresh at every call."""
    if isinstance(data, DataLoader):
        return lambda: iter(data)
    if isinstance(data, Dataset):
        loader = DataLoader(data, batch_size=batch_size, shuffle=False)
        return lambda: iter(loader)
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return _tensor_batches(data[0].to(device), data[1].to(device), batch_size)
    raise TypeError(f"readout data must be a fastl2r Task, a Dataset or DataLoader of (input, label) pairs, "
                    f"or an (inputs, labels) pair of tensors; got {type(data).__name__}")


@dataclass
class ReadoutResult:
    """One readout of one task: how much the representation still holds (``readout``) and what the task's own
    head still gets right (``original``)."""

    readout: float              # accuracy of a fresh linear readout
    original: Optional[float]   # accuracy of the task's own head (None if no head given)


class ReadoutSet:
    """A readout's training and test data: a ``Task`` alone, or ``train`` and ``test`` (see the
    module's docstring).  ``device``: where the data is kept (default: each batch goes to the
    evaluated module's device); ``num_classes``: default the largest label + 1."""

    def __init__(self, train: Task | ReadoutData, test: Optional[ReadoutData] = None, *,
                 device: torch.device | str | None = None, num_classes: Optional[int] = None,
                 steps: int = READOUT_STEPS, lr: float = READOUT_LR, seed: int = 0, batch_size: int = BATCH_SIZE):
        self.device = torch.device(device) if device is not None else None
        self.steps, self.lr, self.seed = steps, lr, seed
        if isinstance(train, Task):
            if test is not None:
                raise TypeError("a Task holds both splits: pass it alone, ReadoutSet(task)")
            self.num_classes = train.num_classes

            def normalise(images: torch.Tensor) -> torch.Tensor:
                return to_float(images, train.dataset)

            self.train = _tensor_batches(train.train_images().to(self.device), train.train_labels().to(self.device),
                                         batch_size, normalise)
            self.test = _tensor_batches(train.test_images().to(self.device), train.test_labels().to(self.device),
                                        batch_size, normalise)
        else:
            if test is None:
                raise TypeError("ReadoutSet needs test data besides the training data (or a Task alone)")
            self.num_classes = num_classes
            self.train = _batches(train, batch_size, self.device)
            self.test = _batches(test, batch_size, self.device)

    def _represent(self, model: Callable, batches: Batches, features: Optional[Callable],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        hs, ys = [], []
        for x, y in batches():
            hs.append(as_vectors(model(x.to(device)), features))
            ys.append(y.to(device))
        return torch.cat(hs), torch.cat(ys)

    def evaluate(self, model: Callable, head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
                 features: Optional[Callable] = None) -> ReadoutResult:
        """Readout accuracy of ``model``'s representation, and of ``head`` on it if given."""
        param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else (self.device or torch.device("cpu"))
        with nvtx_range("readout"), eval_mode(model), torch.no_grad():
            train_h, train_y = self._represent(model, self.train, features, device)
            test_h, test_y = self._represent(model, self.test, features, device)
            original = accuracy(head(test_h), test_y) if head is not None else None
        classes = self.num_classes or int(torch.cat([train_y, test_y]).max()) + 1
        readout = linear_readout(train_h, train_y, test_h, test_y, classes, steps=self.steps, lr=self.lr,
                                 seed=self.seed)
        return ReadoutResult(readout, original)
