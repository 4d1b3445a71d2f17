"""Teacher (DESIGN §1.6): multi-task SGD on the old tasks and the new one together."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..data import Batch
from ..methods import Learner, Method
from ..supervised import join, multitask_loss
from .sgd import SGDLearner


class TeacherLearner(SGDLearner):
    """SGD on ``x_a ∪ x_b``, each example through its own task's head."""

    def loss(self, new: Batch, old: Optional[Batch]) -> torch.Tensor:
        """Multi-task cross-entropy over the old tasks' batch and the new task's, each example through its own
        task's head."""
        batch = join(old, new, task_offset_b=self.task_index)
        return multitask_loss(self.model.heads, self.model(batch.x), batch.y, batch.task)


class Teacher(Method):
    """The multi-task teacher as a method (§1.6): what the student imitates, trained on old and new data
    together."""

    name = "teacher"
    needs_old_data = True

    def learner(self, model: nn.Module, run: int) -> Learner:
        """A ``TeacherLearner`` at this method's ``lr``."""
        return TeacherLearner(model, self.options["lr"])
