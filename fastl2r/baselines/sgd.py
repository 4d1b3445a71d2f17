"""SGD and SGD×0.1 (DESIGN §1.6): plain SGD on the new task's cross-entropy."""
from __future__ import annotations

import abc
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch, Task
from ..methods import Learner, Method
from ..run_slots import RunRNGs, SlotLearner, SlotNetwork, SlotSGD


class SGDLearner(Learner):
    """Plain SGD (no momentum) of every parameter on the current task's cross-entropy."""

    def __init__(self, model: nn.Module, lr: float):
        super().__init__(model)
        self.lr = lr
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def begin_task(self, task_index: int, task: Task) -> None:
        """Start a fresh SGD optimizer over every parameter, the new head included."""
        super().begin_task(task_index, task)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def loss(self, new: Batch, old: Optional[Batch]) -> torch.Tensor:
        """The new task's cross-entropy through its own head; the baselines built on SGD add their terms here."""
        return F.cross_entropy(self.model.heads[self.task_index](self.model(new.x)), new.y)

    def step(self, new: Batch, old: Optional[Batch]) -> None:
        """One SGD step on ``loss(new, old)``."""
        loss = self.loss(new, old)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class SGD(Method):
    """The SGD baseline (§1.6): plain SGD at ``methods.sgd.lr``, what the headline comparison measures the
    others against."""

    name = "sgd"

    def learner(self, model: nn.Module, run: int) -> Learner:
        """An ``SGDLearner`` at this method's ``lr``."""
        return SGDLearner(model, self.options["lr"])

    def slot_learner(self, network: SlotNetwork, runs: Sequence[int], rngs: RunRNGs) -> SlotLearner:
        """``SlotSGD`` at this method's ``lr``: its runs go side by side."""
        return SlotSGD(network, self.options["lr"])


class SGDx01(SGD):
    """SGD at a tenth of the learning rate (``methods.sgd_x0.1.lr``)."""

    name = "sgd_x0.1"


class SGDFromBackbone(Method):
    """The SGD protocol from a backbone the method prepares itself (MAML, Rep): ``backbone_state``
    gives it, cached, with Task A's head ``heads.0``; its other entries go into ``results.json``."""

    facts_key: ClassVar[str]

    @abc.abstractmethod
    def build_backbone(self, index: int) -> dict:
        """``{"model": state_dict, **facts}``, prepared from pre-trained checkpoint ``index``."""

    @abc.abstractmethod
    def cache_key(self) -> dict:
        """What shapes the backbone besides what shapes ``w0`` (the cache key's ``extra``)."""

    def backbone_state(self) -> dict:
        """The backbone prepared from the meta-test's checkpoint (``model`` and the facts), built once, then
        read from the disk cache."""
        index = self.workspace.metatest_checkpoint
        return self.workspace.cached_state(self.name, index, lambda: self.build_backbone(index),
                                            extra=self.cache_key())

    def prepare(self) -> None:
        """Build (or load from the cache) the backbone once per experiment, keeping its facts for ``info``."""
        self.facts = {k: v for k, v in self.backbone_state().items() if k != "model"}

    def info(self) -> dict:
        """The backbone's facts under ``facts_key``, for ``results.json``."""
        return {self.facts_key: self.facts}

    def initial_model(self, run: int) -> nn.Module:
        """A fresh network with Task A's head, loaded with the prepared backbone: where every run starts
        instead of ``w0``."""
        model = self.workspace.new_model([self.workspace.source_task().num_classes])
        model.load_state_dict(self.backbone_state()["model"])
        return model

    def learner(self, model: nn.Module, run: int) -> Learner:
        """Plain SGD at this method's ``lr``: the meta-test's SGD protocol."""
        return SGDLearner(model, self.options["lr"])

    def slot_learner(self, network: SlotNetwork, runs: Sequence[int], rngs: RunRNGs) -> SlotLearner:
        """``SlotSGD`` at this method's ``lr``: its runs go side by side."""
        return SlotSGD(network, self.options["lr"])
