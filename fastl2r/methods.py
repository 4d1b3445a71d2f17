"""A method is an update rule plugged into the one meta-test loop (``metatest.run_metatest``).

``Method.prepare`` runs once per experiment (pre-train a backbone, meta-train, ...);
``Method.learner`` gives, per run, the object whose ``step`` trains the network on the
new task's batches.  Readouts call ``Learner.features``/``Learner.head``.
"""
from __future__ import annotations

import abc
import importlib
from pathlib import Path
from typing import Callable, ClassVar, Optional, Sequence

import torch
import torch.nn as nn

from .data import Batch, Task
from .errors import UserError
from .run_slots import RunRNGs, SlotLearner, SlotNetwork
from .workspace import Workspace


# name -> "module:Class" (built in) or the class (``fastl2r.register_method``); the order is the
# default order of ``--methods``.
METHODS: dict[str, str | type] = {
    "ours": "fastl2r.meta.ours:Ours",
    "sgd": "fastl2r.baselines.sgd:SGD",
    "sgd_x0.1": "fastl2r.baselines.sgd:SGDx01",
    "sgd_mean_delta": "fastl2r.baselines.scaled_sgd:ScaledSGD",
    "teacher": "fastl2r.baselines.teacher:Teacher",
    "lwf": "fastl2r.baselines.lwf:LwF",
    "ewc": "fastl2r.baselines.ewc:EWC",
    "hat": "fastl2r.baselines.hat:HAT",
    "maml": "fastl2r.baselines.maml:MAML",
    "rep": "fastl2r.baselines.rep:Rep",
}
BUILT_IN_METHODS = tuple(METHODS)
METHOD_OPTIONS: dict[str, dict] = {}  # a registered method's options (``config["methods"][name]``)


class Learner(abc.ABC):
    """Trains ``model`` on one new task after another."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.task_index = 0

    def begin_task(self, task_index: int, task: Task) -> None:
        """A new task starts; its fresh head is ``model.heads[task_index]``."""
        self.task_index = task_index

    @abc.abstractmethod
    def step(self, new: Batch, old: Optional[Batch]) -> None:
        """One update on a batch of the new task (``old``: of the earlier tasks, if asked for)."""

    def features(self, task_index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The representation used to read out task ``task_index``."""
        return self.model

    def head(self, task_index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """The task's own classifier on its representation, whose accuracy is a readout's ``original`` (§1.5):
        by default ``model.heads[task_index]``."""
        return self.model.heads[task_index]


class Method(abc.ABC):
    """An update rule compared in the meta-test: prepared once per experiment, then one ``Learner`` per run
    (see the module docstring)."""

    name: ClassVar[str]
    needs_old_data: ClassVar[bool] = False  # the learner's ``step`` gets batches of earlier tasks

    def __init__(self, workspace: Workspace, options: dict):
        self.workspace = workspace
        self.options = options

    def prepare(self) -> None:
        """Work done once per experiment, before the runs (pre-train a backbone, meta-train, measure); nothing
        by default."""

    def info(self) -> dict:
        """Facts about the method's preparation worth keeping in ``results.json``."""
        return {}

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """Figures or files of the method's own (e.g. meta-training curves); returns their paths."""
        return []

    def state_dict(self) -> dict:
        """What the method has gathered from its finished runs beyond their curves (for its
        artifacts), kept with the meta-test's progress so that a resumed meta-test has it too."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back ``state_dict()`` of an interrupted meta-test, before its remaining runs."""

    def initial_model(self, run: int) -> nn.Module:
        """The network a run starts from: by default the pre-trained ``w0``."""
        return self.workspace.pretrained_model()

    @abc.abstractmethod
    def learner(self, model: nn.Module, run: int) -> Learner:
        """The ``Learner`` that trains ``model`` (from ``initial_model(run)``) through run ``run``'s new
        tasks."""

    def slot_learner(self, network: SlotNetwork, runs: Sequence[int], rngs: RunRNGs) -> SlotLearner:
        """The learner that trains runs ``runs`` side by side as the slots of ``network`` (``--parallel-runs``),
        each slot as ``learner`` trains its run (``rngs``: each run's own RNG).  A method that does not
        override it runs its runs one at a time."""
        raise NotImplementedError(f"{self.name}: its runs go one at a time (no slot_learner)")


def method_class(name: str) -> type[Method]:
    """The ``Method`` class registered as ``name``, its module imported only now (a method not run costs no
    import); an unknown name is a UserError."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    if isinstance(METHODS[name], type):
        return METHODS[name]
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_methods(text: Optional[str]) -> list[str]:
    """``a,b,c`` -> validated, de-duplicated names; ``None`` -> every method."""
    if text is None:
        return list(METHODS)
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise UserError("--methods is empty; choose from: " + ", ".join(METHODS))
    if not all(names):
        raise UserError(f"--methods {text!r} has an empty name; separate the names with single commas")
    for n in names:
        if n not in METHODS:
            raise UserError(f"unknown method {n!r}; choose from: {', '.join(METHODS)}")
    return list(dict.fromkeys(names))
