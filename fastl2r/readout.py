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

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

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


@dataclass
class ReadoutProblem:
    """One linear readout to fit: training and test features ``[N, D]`` with their labels, the number of
    classes, and the seed of the fresh layer's initialisation."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train_features.shape[0] == 0 or self.test_features.shape[0] == 0:
            raise ValueError("a linear readout needs at least one training and one test example")


def linear_readout(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, num_classes: int, *, steps: int = READOUT_STEPS,
                   lr: float = READOUT_LR, seed: int = 0) -> float:
    """Test accuracy (a fraction) of a linear layer fitted with ``steps`` full-batch Adam steps."""
    problem = ReadoutProblem(train_features, train_labels, test_features, test_labels, num_classes, seed)
    return linear_readouts([problem], steps=steps, lr=lr)[0]


def linear_readouts(problems: Sequence[ReadoutProblem], *, steps: int = READOUT_STEPS,
                    lr: float = READOUT_LR) -> list[float]:
    """Test accuracy of each problem's linear layer, all fitted as one batched problem.

    Why batched: a readout is hundreds of tiny Adam steps, bound by per-call overhead (a launch per op on
    a GPU), and a meta-test evaluation fits several (every task seen, every run).  Each problem's layer is
    initialised as ``nn.Linear``'s default from its own seed, and its loss is its own mean cross-entropy:
    padded examples weigh nothing and padded classes get −∞ logits, so no gradient, and Adam, which is
    elementwise, moves each layer as if it were fitted alone (up to the matmuls' summation order).
    Problems of one feature width, dtype and device; one host read for all accuracies."""
    if not problems:
        return []
    first = problems[0].train_features
    dim, dtype, device = first.shape[1], first.dtype, first.device
    if any(p.train_features.shape[1] != dim or p.test_features.shape[1] != dim or p.train_features.dtype != dtype
           or p.train_features.device != device for p in problems):
        raise ValueError("batched readouts need features of one width, dtype and device")
    count, classes = len(problems), max(p.num_classes for p in problems)
    weight = torch.zeros(count, dim, classes, dtype=dtype)
    bias = torch.zeros(count, 1, classes, dtype=dtype)
    bound = 1.0 / dim ** 0.5  # nn.Linear's default init, drawn from each problem's own generator
    for i, p in enumerate(problems):
        generator = torch.Generator().manual_seed(p.seed)
        weight[i, :, :p.num_classes] = (torch.rand(p.num_classes, dim, generator=generator) * 2 * bound - bound).T
        bias[i, 0, :p.num_classes] = torch.rand(p.num_classes, generator=generator) * 2 * bound - bound
    weight, bias = weight.to(device).requires_grad_(), bias.to(device).requires_grad_()
    valid = (torch.arange(classes) < torch.tensor([[p.num_classes] for p in problems])).unsqueeze(1).to(device)

    def stacked(split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = [getattr(p, f"{split}_features").detach() for p in problems]
        labels = [getattr(p, f"{split}_labels") for p in problems]
        rows = max(f.shape[0] for f in features)
        x = torch.zeros(count, rows, dim, dtype=dtype, device=device)
        y = torch.zeros(count, rows, dtype=torch.int64, device=device)
        share = torch.zeros(count, rows, dtype=dtype, device=device)  # 1/N of a real row, 0 of padding
        for i, (f, l) in enumerate(zip(features, labels)):
            x[i, :f.shape[0]], y[i, :f.shape[0]], share[i, :f.shape[0]] = f, l, 1.0 / f.shape[0]
        return x, y, share

    def logits(x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(bias, x, weight).masked_fill(~valid, -math.inf)

    x, y, share = stacked("train")
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            losses = F.cross_entropy(logits(x).flatten(0, 1), y.flatten(), reduction="none")
            (losses * share.flatten()).sum().backward()
            optimizer.step()
    x, y, share = stacked("test")
    with torch.no_grad():
        correct = ((logits(x).argmax(dim=2) == y) & (share > 0)).sum(dim=1)
    return [c / p.test_features.shape[0] for c, p in zip(correct.tolist(), problems)]


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

    def problem(self, model: Callable, head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
                features: Optional[Callable] = None) -> tuple[ReadoutProblem, Optional[float]]:
        """``model``'s representation of both splits as a readout problem to fit, and the accuracy of
        ``head`` on it if given."""
        param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = param.device if param is not None else (self.device or torch.device("cpu"))
        with eval_mode(model), torch.no_grad():
            train_h, train_y = self._represent(model, self.train, features, device)
            test_h, test_y = self._represent(model, self.test, features, device)
            original = accuracy(head(test_h), test_y) if head is not None else None
        classes = self.num_classes or int(torch.cat([train_y, test_y]).max()) + 1
        return ReadoutProblem(train_h, train_y, test_h, test_y, classes, self.seed), original

    def evaluate(self, model: Callable, head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, *,
                 features: Optional[Callable] = None) -> ReadoutResult:
        """Readout accuracy of ``model``'s representation, and of ``head`` on it if given."""
        with nvtx_range("readout"):
            problem, original = self.problem(model, head, features=features)
            return ReadoutResult(linear_readouts([problem], steps=self.steps, lr=self.lr)[0], original)


def evaluate_readouts(readouts: Sequence[tuple[ReadoutSet, Callable, Optional[Callable]]]) -> list[ReadoutResult]:
    """``ReadoutSet.evaluate`` of each ``(readout set, model, head)``, the linear layers of those with the same
    steps, lr and feature width, dtype and device fitted as one batched problem (``linear_readouts``): a
    meta-test evaluation reads out every task seen at once."""
    fitted: list[Optional[float]] = [None] * len(readouts)
    with nvtx_range("readout"):
        problems = [readout.problem(model, head) for readout, model, head in readouts]

        def batch_key(i: int) -> tuple:  # what one batched fit needs in common
            features = problems[i][0].train_features
            return readouts[i][0].steps, readouts[i][0].lr, features.shape[1], features.dtype, features.device

        for key in dict.fromkeys(map(batch_key, range(len(readouts)))):
            chosen = [i for i in range(len(readouts)) if batch_key(i) == key]
            accuracies = linear_readouts([problems[i][0] for i in chosen], steps=key[0], lr=key[1])
            for i, value in zip(chosen, accuracies):
                fitted[i] = value
    return [ReadoutResult(value, original) for value, (_, original) in zip(fitted, problems)]
