"""Rep (DESIGN §1.6): a backbone pre-trained with cross-entropy on Task A and the meta-training
classes together, then the SGD protocol from it.

The pre-training is multi-head (ours): one head for Task A, one over all meta-training classes of
each (dataset, image part, transform) the meta-training tasks draw from (Experiment 1: classes
5–9, first half of their images; the others: the whole pool), each example through its own task's
head, as ``w0``'s pre-training does for one task. A joint head over every class would need one
task across two datasets (CIFAR-10 and CIFAR-100 in the paper suite); multi-head keeps Task A's
head as the "original" head of the meta-test. It starts from scratch, with ``w0``'s seed (its
extra heads draw before the convolutions are initialised, so its initial backbone is not
``w0``'s), and uses ``w0``'s pre-training settings (``pretrain``) for ``methods.rep.epochs``
epochs of the union; the meta-test keeps the backbone and Task A's head and drops the
meta-training head. Cached.
"""
from __future__ import annotations

import time

import torch

from ..data import NO_TRANSFORM, Task
from ..supervised import head_accuracy, steps_for_epochs, train_supervised
from ..workspace import Workspace
from .sgd import SGDFromBackbone


def representation_tasks(workspace: Workspace) -> list[Task]:
    """Task A, then one task per (dataset, image part, transform) holding every meta-training class."""
    pools: dict[tuple[str, str, str], set[int]] = {}
    for spec in workspace.config["tasks"]["meta_train"]:
        classes = spec["classes"] if "classes" in spec else spec["pool"]
        images = (spec["dataset"], spec["train_part"], spec.get("transform", NO_TRANSFORM))
        pools.setdefault(images, set()).update(classes)
    return [workspace.source_task()] + [
        workspace.task({"dataset": dataset, "train_part": part, "transform": transform}, sorted(classes))
        for (dataset, part, transform), classes in pools.items()]


class Rep(SGDFromBackbone):
    """The Rep baseline (§1.6): a backbone pre-trained on Task A and the meta-training classes together, then
    the SGD protocol."""

    name = "rep"
    facts_key = "pretraining"

    def cache_key(self) -> dict:
        """The meta-training tasks and ``epochs``: what the cached backbone depends on beyond what shapes
        ``w0``."""
        return {"meta_train": self.workspace.config["tasks"]["meta_train"], "epochs": self.options["epochs"]}

    def build_backbone(self, index: int) -> dict:
        """Pre-train a fresh network (with the seed of ``w0`` number ``index``) on ``representation_tasks``;
        returns its backbone with Task A's head, and the tasks, steps, time and test accuracies."""
        ws, o = self.workspace, self.options
        tasks, p = representation_tasks(ws), ws.config["pretrain"]
        seed = ws.config["seed"] * 1000 + index
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = ws.new_model([t.num_classes for t in tasks])
        steps = steps_for_epochs(tasks, o["epochs"], p["batch_size"])
        start = time.perf_counter()
        train_supervised(model, tasks, steps=steps, lr=p["lr"], momentum=p["momentum"],
                         weight_decay=p["weight_decay"], batch_size=p["batch_size"],
                         warmup_fraction=p["warmup_fraction"], device=ws.device, seed=seed,
                         desc="pre-training Rep on " + " + ".join(t.name for t in tasks), progress=ws.progress)
        kept = {k: v.cpu() for k, v in model.state_dict().items()
                if not k.startswith("heads.") or k.startswith("heads.0.")}
        return {"model": kept, "tasks": [t.name for t in tasks], "steps": steps,
                "seconds": round(time.perf_counter() - start, 1),
                "test_accuracy": [head_accuracy(model, t, i, ws.device) for i, t in enumerate(tasks)]}
