"""LwF (Li & Hoiem 2018; DESIGN §1.6): the new task's cross-entropy plus distillation of every
old head's outputs on the new task's batch toward those of the network as it was when the task
began (``w0`` for Task B; in Experiment 5 the network after Task 2 while Task 3 is learned).
α = ``methods.lwf.alpha`` = 1.0 is the paper's validated value, the temperature
``methods.lwf.temperature`` = 2 Li & Hoiem's."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch, Task
from ..methods import Learner, Method
from .sgd import SGDLearner


def distillation(logits: torch.Tensor, old_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(old/T) ‖ softmax(new/T))``, mean over the batch.

    Li & Hoiem's loss is the cross-entropy against the soft targets ``softmax(old/T)``; the KL
    differs from it by the targets' entropy, a constant, so the gradient is the same and the
    term is zero while the outputs agree.  No ``T²`` factor (Li & Hoiem use none).
    """
    return F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(old_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)


class LwFLearner(SGDLearner):
    """SGD on ``CE_new + alpha · Σ_old-heads distillation``; the targets come from a frozen copy of
    the network taken at ``begin_task``, applied to the same (augmented) batch."""

    def __init__(self, model: nn.Module, lr: float, alpha: float, temperature: float):
        super().__init__(model, lr)
        self.alpha = alpha
        self.temperature = temperature
        self.reference: Optional[nn.Module] = None

    def begin_task(self, task_index: int, task: Task) -> None:
        """Freeze a copy of the network as it is now: its old heads' outputs are the targets while this task
        is learned."""
        super().begin_task(task_index, task)
        self.reference = copy.deepcopy(self.model).requires_grad_(False)

    def loss(self, new: Batch, old: Optional[Batch]) -> torch.Tensor:
        """The new task's cross-entropy plus ``alpha`` × the distillation of every old head toward the frozen
        copy's, on the same batch."""
        h = self.model(new.x)
        loss = F.cross_entropy(self.model.heads[self.task_index](h), new.y)
        with torch.no_grad():
            h_old = self.reference(new.x)
        for t in range(self.task_index):
            loss = loss + self.alpha * distillation(self.model.heads[t](h), self.reference.heads[t](h_old),
                                                    self.temperature)
        return loss


class LwF(Method):
    """The LwF baseline (§1.6): keep the old heads' outputs on the new task's images, without old data."""

    name = "lwf"

    def learner(self, model: nn.Module, run: int) -> Learner:
        """An ``LwFLearner`` with this method's ``lr``, ``alpha`` and ``temperature``."""
        o = self.options
        return LwFLearner(model, o["lr"], o["alpha"], o["temperature"])
