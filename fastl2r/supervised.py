"""Supervised training pieces shared by pre-training, the teacher and the baselines."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import Batch, Task, TaskSampler, to_float


def multitask_loss(heads: Sequence[nn.Module], h: torch.Tensor, y: torch.Tensor,
                   task: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of every example under its own task's head (``heads[task]``)."""
    total = h.new_zeros(())
    for t in task.unique().tolist():
        mask = task == t
        total = total + F.cross_entropy(heads[t](h[mask]), y[mask], reduction="sum")
    return total / h.shape[0]


def join(a: Batch, b: Batch, task_offset_b: int = 0) -> Batch:
    """One batch holding ``a`` then ``b`` (``b``'s task indices shifted by ``task_offset_b``)."""
    return Batch(torch.cat([a.x, b.x]), torch.cat([a.y, b.y]), torch.cat([a.task, b.task + task_offset_b]))


def warmup_cosine(step: int, total: int, warmup_fraction: float) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to zero."""
    warmup = int(total * warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def steps_for_epochs(tasks: Sequence[Task], epochs: float, batch_size: int) -> int:
    """Batches of ``batch_size`` in ``epochs`` passes over the union of ``tasks`` (at least one): pre-training
    schedules are given in epochs."""
    images = sum(len(t.train_index) for t in tasks)
    return max(1, math.ceil(epochs * images / batch_size))


def train_supervised(model: nn.Module, tasks: Sequence[Task], *, steps: int, lr: float, momentum: float,
                     weight_decay: float, batch_size: int, warmup_fraction: float, device: torch.device | str,
                     seed: int, desc: str = "pre-training", progress: bool = True) -> None:
    """SGD with momentum on the union of ``tasks``, task ``i`` through ``model.heads[i]``."""
    model.train()
    sampler = TaskSampler(tasks, batch_size, device=device, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup_fraction))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = sampler.sample()
        loss = multitask_loss(model.heads, model(batch.x), batch.y, batch.task)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")


@torch.no_grad()
def head_accuracy(model: nn.Module, task: Task, head: int, device: torch.device | str,
                  batch_size: int = 1000) -> float:
    """Test accuracy of ``model.heads[head]`` on ``task``."""
    images, labels = task.test_images(), task.test_labels().to(device)
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = to_float(images[i:i + batch_size].to(device), task.dataset)
        correct += (model.heads[head](model(x)).argmax(1) == labels[i:i + batch_size]).sum().item()
    return correct / max(1, images.shape[0])
