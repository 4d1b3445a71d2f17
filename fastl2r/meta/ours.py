"""``ours`` in the meta-test: the trained meta-learner updates the student (no teacher)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data import Batch, Task
from ..methods import Learner, Method
from ..run_slots import RunRNGs, SlotLearner, SlotNetwork, SlotSGD, new_task_loss
from .metalearner import MetaLearner, activation_means, record_activations, tapped_layers
from .optimizer import LearnedOptimizer, load_metalearner
from .trainer import MetaTrainer, how_episodes_ended

DELTA_SAMPLES_PER_TENSOR = 256  # δ values kept per tensor and recording step, for Figure 7


class OursLearner(Learner):
    """Meta-learned updates; every ``record_every`` steps a sample of δ goes into ``deltas``."""

    def __init__(self, model: nn.Module, meta: MetaLearner, deltas: Optional[dict] = None, record_every: int = 0):
        super().__init__(model)
        self.optimizer = LearnedOptimizer(model, meta)
        self.record_every = record_every
        self.steps = 0
        self.deltas = deltas

    def begin_task(self, task_index: int, task: Task) -> None:
        """Add the new task's head to the optimizer (plain SGD); the meta-nets' LSTM states go on across
        tasks."""
        super().begin_task(task_index, task)
        self.optimizer.add_param_group({"params": self.model.heads[task_index].parameters()})

    def step(self, new: Batch, old: Optional[Batch]) -> None:
        """One learned update on the new task's cross-entropy (no teacher, no old data); every
        ``record_every`` steps, a sample of δ is kept."""
        loss = F.cross_entropy(self.model.heads[self.task_index](self.model(new.x)), new.y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        if self.deltas is not None and self.steps % self.record_every == 0:
            record_deltas(self.deltas, self.optimizer.meta, self.optimizer.last_deltas)


def record_deltas(deltas: dict[str, list[torch.Tensor]], meta: MetaLearner, step_deltas: Sequence[torch.Tensor],
                  slots: int = 1, slot: int = 0) -> None:
    """Keep a sample (``DELTA_SAMPLES_PER_TENSOR``, drawn with the global RNG) of each gated tensor's δ of a
    step, by Figure 7's kind; ``step_deltas``: per group, of ``slots`` slots, of which ``slot``'s are kept."""
    for group, delta in zip(meta.groups, step_deltas):
        for tensor, rows in zip(group.tensors, delta.split([slots * r for r in group.rows])):
            kind = delta_kind(tensor.name, tensor.kind, tensor.rows)
            flat = rows.view(slots, tensor.rows, -1)[slot].reshape(-1)
            if flat.numel() > DELTA_SAMPLES_PER_TENSOR:
                flat = flat[torch.randperm(flat.numel(), device=flat.device)[:DELTA_SAMPLES_PER_TENSOR]]
            deltas.setdefault(kind, []).append(flat.float().cpu())


class SlotOurs(SlotSGD):
    """``OursLearner`` for R runs: the frozen meta-learner scales every slot's gated gradients by its δ (its
    rows folded as in meta-training), plain SGD the others and the heads; the meta-nets' LSTM states go on
    across tasks.  When run 0 is a slot, its δ samples are kept every ``record_every`` steps, drawn with
    run 0's own RNG."""

    def __init__(self, network: SlotNetwork, meta: MetaLearner, runs: Sequence[int], rngs: RunRNGs,
                 deltas: dict, record_every: int):
        super().__init__(network, meta.lr)
        self.meta, self.rngs, self.deltas, self.record_every = meta, rngs, deltas, record_every
        self.recorded = list(runs).index(0) if 0 in runs and record_every else None
        self.layers = tapped_layers(network.skeleton, meta.head_prefix)
        self.gated = [t.name for t in meta.meta_tensors]
        weight = next(iter(network.weights.values()))
        self.dtype = next(meta.parameters()).dtype
        self.lstm = meta.initial_state(weight.device, self.dtype, slots=network.slots)
        self.means: Optional[torch.Tensor] = None  # the tapped layers' activation means of this step
        self.steps = 0

    def loss(self, weights: dict[str, torch.Tensor], heads: list[torch.Tensor], new: Batch,
             old: Optional[Batch]) -> torch.Tensor:
        """``[R]``: each run's new-task cross-entropy (no teacher, no old data); the activation means the
        meta-nets read are recorded on the way."""
        with record_activations(self.network.skeleton, self.layers) as activations:
            h = self.network.represent(new.x, weights)
        self.means = activation_means(self.layers, activations).to(self.dtype)
        return new_task_loss(self.network, h, heads, self.task_index, new.y)

    def directions(self, weights: dict[str, torch.Tensor],
                   grads: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """As ``LearnedOptimizer.step``: δ⊙g for a gated tensor (one step of the meta-nets), g for the others."""
        meta, slots, grads = self.meta, self.network.slots, dict(zip(weights, grads))
        with torch.no_grad():
            flat = meta.flatten({n: weights[n].to(self.dtype) for n in self.gated}, slots)
            flat_grads = meta.flatten({n: grads[n].to(self.dtype) for n in self.gated}, slots)
            _, self.lstm, step_deltas = meta.step(flat, flat_grads, self.means, self.lstm)
            delta = meta.unflatten(step_deltas, slots)
        self.steps += 1
        if self.recorded is not None and self.steps % self.record_every == 0:
            with self.rngs.use(0):
                record_deltas(self.deltas, meta, step_deltas, slots, self.recorded)
        return [delta[n].to(g.dtype) * g if n in delta and g is not None else g for n, g in grads.items()]


def delta_kind(name: str, kind: str, rows: int) -> str:
    """Figure 7's layer groups: conv weights by width (a ResNet stage), GroupNorm γ and β."""
    if kind == "norm":
        return "GroupNorm γ" if name.endswith("weight") else "GroupNorm β"
    return f"{kind} weights, {rows} channels"


class Ours(Method):
    """The paper's method at meta-test (§1.6): the meta-learner, meta-trained here or loaded, updates the
    student alone."""

    name = "ours"

    def prepare(self) -> None:
        """Load the meta-learner of ``methods.ours.metalearner``, else meta-train one (resuming the run
        folder's checkpoint, if any); then freeze it for the runs."""
        ws = self.workspace
        path = self.options.get("metalearner") or ""
        model = ws.new_model()
        lr = ws.config["metatrain"]["lr"]
        self.history, self.training = [], {}
        if path:
            self.meta = load_metalearner(path, model, ws.device, lr=lr, arch=ws.config["arch"])
        else:
            trainer = MetaTrainer(ws, run_dir=ws.out_dir)
            if ws.out_dir is not None:
                trainer.resume(ws.out_dir)
            self.meta = trainer.train(progress=ws.progress, on_episode=ws.log.episode)
            self.history = trainer.progress.history
            p = trainer.progress
            self.training = {"episodes": p.episode, "inner_steps": p.inner_steps, "nonfinite_episodes": p.nonfinite,
                             "seconds": round(p.seconds, 1),
                             "inner_steps_per_second": round(trainer.steps_per_second, 3),
                             "ended_by_threshold": how_episodes_ended(self.history)}
        self.meta.requires_grad_(False)
        self.deltas: dict[str, list[torch.Tensor]] = {}

    def state_dict(self) -> dict:
        """The δ samples recorded so far (Figure 7), kept with the meta-test's progress."""
        return {"deltas": self.deltas}

    def load_state_dict(self, state: dict) -> None:
        """Take back the δ samples of an interrupted meta-test."""
        self.deltas = state["deltas"]

    def info(self) -> dict:
        """Meta-training's facts (episodes, inner steps, non-finite episodes, time, speed, and how the episodes
        of each loss threshold ended: restarts or the horizon) when this run meta-trained; nothing for a loaded
        meta-learner."""
        return {"metatrain": self.training} if self.training else {}

    def write_artifacts(self, out_dir: Path) -> list[Path]:
        """The meta-training figure (Figure 6, when this run meta-trained) and the δ histogram (Figure 7, from
        run 0); returns their paths."""
        from ..plots import figure_delta_histogram, figure_metatraining, save

        paths = []
        if self.history:
            paths.append(save(figure_metatraining(self.history), out_dir / "metatraining.png"))
        if self.deltas:
            paths.append(save(figure_delta_histogram({k: torch.cat(v) for k, v in self.deltas.items()}),
                              out_dir / "deltas.png"))
        return paths

    def learner(self, model: nn.Module, run: int) -> Learner:
        """An ``OursLearner`` on the frozen meta-learner; run 0 also samples δ every ``eval_every`` steps for
        Figure 7."""
        every = self.workspace.config["metatest"]["eval_every"] if run == 0 else 0
        return OursLearner(model, self.meta, self.deltas if every else None, every)

    def slot_learner(self, network: SlotNetwork, runs: Sequence[int], rngs: RunRNGs) -> SlotLearner:
        """``SlotOurs`` on the frozen meta-learner; run 0, if among ``runs``, samples δ as ``learner``'s does."""
        return SlotOurs(network, self.meta, runs, rngs, self.deltas, self.workspace.config["metatest"]["eval_every"])
