"""``sgd_mean_delta`` (ours, a control): SGD whose learning rate is SGD's times the learned rule's
mean multiplier δ — does the learned rule do more than take smaller (or larger) steps?

The mean δ is measured once per experiment, before the runs, on meta-*training* data only: the
learned rule — the meta-learner this run trains for ``ours`` (its ``metalearner.pt``), or the one
given by ``methods.ours.metalearner`` / ``--metalearner``, or ``methods.sgd_mean_delta.metalearner``
— trains a copy of ``w0`` with a fresh head on a new task drawn from the meta-training pool (the
run's seed) for the meta-test horizon, and δ is averaged over every gated weight and every step.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import TaskSampler
from ..errors import UserError
from ..meta.optimizer import LearnedOptimizer, load_metalearner
from ..methods import Learner, Method
from ..run_slots import RunRNGs, SlotLearner, SlotNetwork, SlotSGD
from .sgd import SGDLearner

METALEARNER = "metalearner.pt"


class ScaledSGD(Method):
    """SGD at the learned rule's mean step multiplier: the control that tells a learned rule from a rescaled
    learning rate (see the module docstring)."""

    name = "sgd_mean_delta"

    def metalearner_path(self) -> Path:
        """The learned rule to measure: this method's option, else ``ours``'s, else the run's."""
        ws = self.workspace
        given = self.options.get("metalearner") or ws.config["methods"]["ours"].get("metalearner")
        path = Path(given) if given else (ws.out_dir / METALEARNER if ws.out_dir is not None else None)
        if path is None or not path.is_file():
            raise UserError("sgd_mean_delta needs a trained meta-learner: run it after ours (--methods ours,...,"
                            "sgd_mean_delta) or give one with --metalearner PATH")
        return path

    def prepare(self) -> None:
        """Measure the learned rule's mean δ on a meta-training task (see the module docstring) and set ``lr``
        to this method's ``lr`` times it."""
        ws = self.workspace
        meta = load_metalearner(self.metalearner_path(), ws.new_model(), ws.device)
        spec = ws.config["tasks"]["meta_train"][0]
        seed = ws.config["seed"]
        task = ws.task(spec, ws.draw_classes([spec], random.Random(seed))[0])
        model = ws.pretrained_model()
        with torch.random.fork_rng(devices=[ws.device] if ws.device.type == "cuda" else []):
            torch.manual_seed(seed)
            head = model.add_head(task.num_classes)
        optimizer = LearnedOptimizer(model, meta)  # the new head included, by plain SGD
        m = ws.config["metatest"]
        sampler = TaskSampler([task], m["batch_size"], device=ws.device, seed=seed)
        total, count = torch.zeros((), dtype=torch.float64, device=ws.device), 0
        for _ in range(m["steps_per_task"]):
            batch = sampler.sample()
            loss = F.cross_entropy(model.heads[head](model(batch.x)), batch.y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += sum(d.double().sum() for d in optimizer.last_deltas)
            count += sum(d.numel() for d in optimizer.last_deltas)
        optimizer.close()
        self.mean_delta = (total / count).item()
        self.lr = self.options["lr"] * self.mean_delta

    def info(self) -> dict:
        """The measured mean δ and the learning rate it gives."""
        return {"mean_delta": self.mean_delta, "lr": self.lr}

    def learner(self, model: nn.Module, run: int) -> Learner:
        """SGD at ``lr`` × the learned rule's mean δ."""
        return SGDLearner(model, self.lr)

    def slot_learner(self, network: SlotNetwork, runs: Sequence[int], rngs: RunRNGs) -> SlotLearner:
        """``SlotSGD`` at the same rate: its runs go side by side."""
        return SlotSGD(network, self.lr)
