"""Device-resident batches: images stay uint8 on the device; only the batch is
augmented (whole batch at once, tensor ops) and converted to normalised float."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from .dataset import ImageDataset
from .tasks import Task

CROP_PADDING = 4


@dataclass
class Batch:
    """``x`` float32 ``[B, C, H, W]`` normalised; ``y`` task-local labels; ``task`` index into the sampler's tasks."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.to(torch.float32) / 255.0 - mean) / std


def to_float(images: torch.Tensor,
             stats: ImageDataset | tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """Normalise uint8 images ``[..., C, H, W]`` with a dataset's (or an explicit ``(mean, std)``)
    per-channel statistics, without augmentation (readout, evaluation)."""
    mean, std = (stats.mean, stats.std) if isinstance(stats, ImageDataset) else stats
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != len(mean):
        raise ValueError(f"images {tuple(images.shape)} do not have {len(mean)} channels at dim -3")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return _normalise(images, mean_t, std_t)


class TaskSampler:
    """Keeps the tasks' images on ``device`` as uint8; returns normalised, augmented float batches.

    Each image of a batch is drawn independently and uniformly from the union of
    the tasks' training images (so a task's share follows its size). Augmentation
    (DESIGN §1.2): a random 32×32 crop of the image zero-padded by 4 pixels per
    side, and a horizontal flip with p=0.5 for datasets where ``flip`` holds. All
    randomness comes from one ``torch.Generator`` on ``device`` seeded with
    ``seed``, so a seed fixes the sequence of batches.
    """

    def __init__(self, tasks: Sequence[Task], batch_size: int, *, device, seed: int, augment: bool = True):
        self.tasks = tuple(tasks)
        if not self.tasks:
            raise UserError("TaskSampler needs at least one task")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        shapes = {tuple(t.dataset.train_images.shape[1:]) for t in self.tasks}
        if len(shapes) > 1:
            raise UserError("tasks in one sampler need images of one shape (channels, height, width); got "
                            + ", ".join(f"{t.name} {tuple(t.dataset.train_images.shape[1:])}" for t in self.tasks))
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.augment = augment
        self.images = torch.cat([t.train_images() for t in self.tasks]).to(self.device)
        self.labels = torch.cat([t.train_labels() for t in self.tasks]).to(self.device)
        self.task_of = torch.cat([torch.full((len(t.train_index),), i, dtype=torch.int64)
                                  for i, t in enumerate(self.tasks)]).to(self.device)
        self._mean = torch.tensor([t.dataset.mean for t in self.tasks], dtype=torch.float32, device=self.device)
        self._std = torch.tensor([t.dataset.std for t in self.tasks], dtype=torch.float32, device=self.device)
        self._flip_ok = torch.tensor([t.dataset.flip for t in self.tasks], device=self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def sample(self) -> Batch:
        index = torch.randint(len(self.images), (self.batch_size,), device=self.device, generator=self.generator)
        images, task = self.images[index], self.task_of[index]
        if self.augment:
            images = self._crop_and_flip(images, task)
        x = _normalise(images, self._mean[task][:, :, None, None], self._std[task][:, :, None, None])
        return Batch(x=x, y=self.labels[index], task=task)

    def _crop_and_flip(self, images: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``out[b, c, i, j] = padded[b, c, dy + i, dx + (W-1-j if flipped else j)]`` for every image at once."""
        n, channels, height, width = images.shape
        padded = F.pad(images, (CROP_PADDING,) * 4)
        dy, dx = torch.randint(0, 2 * CROP_PADDING + 1, (2, n, 1), device=self.device, generator=self.generator)
        flipped = (torch.rand(n, 1, device=self.device, generator=self.generator) < 0.5) & self._flip_ok[task][:, None]
        cols = torch.arange(width, device=self.device)
        rows = dy + torch.arange(height, device=self.device)
        cols = dx + torch.where(flipped, width - 1 - cols, cols)
        batch = torch.arange(n, device=self.device)[:, None, None, None]
        channel = torch.arange(channels, device=self.device)[None, :, None, None]
        return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
