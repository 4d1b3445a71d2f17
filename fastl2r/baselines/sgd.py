"""SGD and SGD×0.1 (DESIGN §1.6): plain SGD on the new task's cross-entropy."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch, Task
from ..methods import Learner, Method


class SGDLearner(Learner):
    """Plain SGD (no momentum) of every parameter on the current task's cross-entropy."""

    def __init__(self, model: nn.Module, lr: float):
        super().__init__(model)
        self.lr = lr
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def begin_task(self, task_index: int, task: Task) -> None:
        super().begin_task(task_index, task)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def loss(self, new: Batch, old: Optional[Batch]) -> torch.Tensor:
        return F.cross_entropy(self.model.heads[self.task_index](self.model(new.x)), new.y)

    def step(self, new: Batch, old: Optional[Batch]) -> None:
        loss = self.loss(new, old)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class SGD(Method):
    name = "sgd"

    def learner(self, model: nn.Module, run: int) -> Learner:
        return SGDLearner(model, self.options["lr"])


class SGDx01(SGD):
    """SGD at a tenth of the learning rate (``methods.sgd_x0.1.lr``)."""

    name = "sgd_x0.1"
