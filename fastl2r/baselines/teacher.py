"""Teacher (DESIGN §1.6): multi-task SGD on the old tasks and the new one together."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..data import Batch
from ..meta.unroll import slot_cross_entropy
from ..methods import Learner, Method
from ..run_slots import RunRNGs, SlotLearner, SlotNetwork, SlotSGD
from ..supervised import join, multitask_loss
from .sgd import SGDLearner


class TeacherLearner(SGDLearner):
    """SGD on ``x_a ∪ x_b``, each example through its own task's head."""

    def loss(self, new: Batch, old: Optional[Batch]) -> torch.Tensor:
        """Multi-task cross-entropy over the old tasks' batch and the new task's, each example through its own
        task's head."""
        batch = join(old, new, task_offset_b=self.task_index)
        return multitask_loss(self.model.heads, self.model(batch.x), batch.y, batch.task)


class SlotTeacher(SlotSGD):
    """``TeacherLearner`` for R runs: each slot's multi-task cross-entropy over its run's old and new batches."""

    def loss(self, weights: dict[str, torch.Tensor], heads: list[torch.Tensor], new: Batch,
             old: Optional[Batch]) -> torch.Tensor:
        """``[R]``: each run's mean cross-entropy over ``old ∪ new``, every example through its task's head."""
        x, y = torch.cat([old.x, new.x], 1), torch.cat([old.y, new.y], 1)
        task = torch.cat([old.task, new.task + self.task_index], 1)
        return slot_cross_entropy(self.network.represent(x, weights), heads, y, task)


class Teacher(Method):
    """The multi-task teacher as a method (§1.6): what the student imitates, trained on old and new data
    together."""

    name = "teacher"
    needs_old_data = True

    def learner(self, model: nn.Module, run: int) -> Learner:
        """A ``TeacherLearner`` at this method's ``lr``."""
        return TeacherLearner(model, self.options["lr"])

    def slot_learner(self, network: SlotNetwork, runs: Sequence[int], rngs: RunRNGs) -> SlotLearner:
        """``SlotTeacher`` at this method's ``lr``: its runs go side by side."""
        return SlotTeacher(network, self.options["lr"])
