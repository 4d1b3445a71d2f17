"""The forgetting measure (DESIGN §1.5): a linear readout retrained on a network's representation.

``linear_readout`` fits a fresh ``Linear(dim, classes)`` from scratch on training
features with full-batch Adam and reports test accuracy.  ``ReadoutSet`` holds a
task's evaluation images on the device, so that measuring any ``nn.Module`` that
returns a representation is one call: ``ReadoutSet(task, device).evaluate(model)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Task, to_float
from .profiling import nvtx_range

READOUT_STEPS = 500
READOUT_LR = 0.1


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
    return (logits.argmax(dim=1) == labels).float().mean().item()


@torch.no_grad()
def representations(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, normalise: Callable,
                    batch_size: int = 1000) -> torch.Tensor:
    """``model`` applied to uint8 ``images`` in batches, without augmentation."""
    return torch.cat([model(normalise(images[i:i + batch_size])) for i in range(0, images.shape[0], batch_size)])


@dataclass
class ReadoutResult:
    readout: float              # accuracy of a fresh linear readout
    original: Optional[float]   # accuracy of the task's own head (None if no head given)


class ReadoutSet:
    """A task's readout images and labels, kept on ``device``."""

    def __init__(self, task: Task, device: torch.device | str, *, steps: int = READOUT_STEPS,
                 lr: float = READOUT_LR, seed: int = 0):
        self.task = task
        self.steps, self.lr, self.seed = steps, lr, seed
        self.train_images = task.train_images().to(device)
        self.train_labels = task.train_labels().to(device)
        self.test_images = task.test_images().to(device)
        self.test_labels = task.test_labels().to(device)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return to_float(images, self.task.dataset)

    def evaluate(self, model: Callable[[torch.Tensor], torch.Tensor],
                 head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> ReadoutResult:
        """Readout accuracy of ``model``'s representation, and of ``head`` on it if given."""
        with nvtx_range("readout"):
            train = representations(model, self.train_images, self._normalise)
            test = representations(model, self.test_images, self._normalise)
            readout = linear_readout(train, self.train_labels, test, self.test_labels, self.task.num_classes,
                                     steps=self.steps, lr=self.lr, seed=self.seed)
            original = None
            if head is not None:
                with torch.no_grad():
                    original = accuracy(head(test), self.test_labels)
        return ReadoutResult(readout, original)
