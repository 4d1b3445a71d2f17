"""EWC (Kirkpatrick et al. 2017; DESIGN §1.6): the new task's cross-entropy plus
``(λ/2) Σ_i F_i (w_i − w*_i)²`` for every earlier task, ``F`` its diagonal Fisher information
at ``w*``, the weights when that task ended.  λ = ``methods.ewc.lambda`` = 1.0, the paper's
validated value.

Normalisation of ``F``: the *mean* over ``N`` examples of the squared per-example gradient of the
log-likelihood, ``F_i = (1/N) Σ_n (∂ log p(ŷ_n | x_n; w*) / ∂w_i)²`` with ``ŷ_n`` drawn from the
model's predictive distribution ``p(· | x_n; w*)`` (the Fisher as Kirkpatrick et al. define it,
not the "empirical" Fisher of the true labels), with no further rescaling.  ``N`` is
``methods.ewc.fisher_samples`` training images of the task (1000 in the paper preset, 500 in
quick, 64 in smoke; un-augmented, drawn without replacement; all of them if the task has fewer).
``F`` covers the parameters the task's log-likelihood depends on: the backbone and the task's own
head.

Task A's Fisher is computed once per experiment at ``w0`` (``prepare``); in Experiment 5 the
Fisher of Task 2 is computed when Task 3 begins, on Task 2's data, with the network as it is then,
and the two penalties add up.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..data import Batch, Task, to_float
from ..methods import Learner, Method
from .sgd import SGDLearner

FISHER_CHUNK = 32  # examples per vectorised per-example-gradient call (bounds the memory)


def likelihood_parameters(model: nn.Module, task_index: int) -> dict[str, torch.Tensor]:
    """The backbone's parameters and those of head ``task_index`` (detached), by name."""
    own_head = f"heads.{task_index}."
    return {name: p.detach() for name, p in model.named_parameters()
            if not name.startswith("heads.") or name.startswith(own_head)}


def sampled_labels(model: nn.Module, task_index: int, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One label per image drawn from the model's predictive distribution ``softmax(heads[task_index](h))``."""
    with torch.no_grad():
        probs = F.softmax(model.heads[task_index](model(x)), dim=1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def fisher_diagonal(model: nn.Module, task_index: int, x: torch.Tensor, labels: torch.Tensor,
                    chunk_size: int = FISHER_CHUNK) -> dict[str, torch.Tensor]:
    """Mean over the examples ``x`` of the squared per-example gradients of ``log p(labels | x)``
    (head ``task_index`` gives the logits), vectorised over ``chunk_size`` examples at a time."""
    params = likelihood_parameters(model, task_index)
    weight, bias = f"heads.{task_index}.weight", f"heads.{task_index}.bias"

    def log_likelihood(p: dict, image: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = functional_call(model, p, (image.unsqueeze(0),))
        log_probs = F.log_softmax(F.linear(h, p[weight], p[bias]), 1)
        return log_probs[0].gather(0, label.unsqueeze(0)).squeeze(0)

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    for images, chunk_labels in zip(x.split(chunk_size), labels.split(chunk_size)):
        for name, g in per_example(params, images, chunk_labels).items():
            fisher[name] += g.pow(2).sum(0)
    return {name: f / x.shape[0] for name, f in fisher.items()}


def task_fisher(model: nn.Module, task_index: int, task: Task, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """``fisher_diagonal`` on ``samples`` training images of ``task`` (seeded choice), labels
    sampled from the model."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(task.train_index), generator=generator)[:samples]
    x = to_float(task.train_images()[chosen].to(device), task.dataset)
    labels = sampled_labels(model, task_index, x, torch.Generator(device=device).manual_seed(seed))
    return fisher_diagonal(model, task_index, x, labels)


@dataclass
class QuadraticPenalty:
    """One earlier task's term: its Fisher and the weights it was computed at."""

    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]


def ewc_penalty(model: nn.Module, penalties: list[QuadraticPenalty], lam: float) -> torch.Tensor:
    """``(λ/2) Σ_tasks Σ_i F_i (w_i − w*_i)²``."""
    params = dict(model.named_parameters())
    total = next(model.parameters()).new_zeros(())
    for term in penalties:
        for name, f in term.fisher.items():
            total = total + (f * (params[name] - term.anchor[name]).pow(2)).sum()
    return 0.5 * lam * total


class EWCLearner(SGDLearner):
    """SGD on ``CE_new + ewc_penalty``; a penalty term is added as each new task begins."""

    def __init__(self, model: nn.Module, lr: float, lam: float, first_fisher: dict[str, torch.Tensor],
                 samples: int, seed: int):
        super().__init__(model, lr)
        self.lam = lam
        self.first_fisher = first_fisher  # Task A's at w0: the weights a run starts from
        self.samples = samples
        self.seed = seed
        self.penalties: list[QuadraticPenalty] = []
        self.previous_task: Optional[Task] = None

    def begin_task(self, task_index: int, task: Task) -> None:
        """Add the penalty term of the task just finished, anchored at the current weights: Task A's Fisher
        from ``prepare`` when the first new task begins, else that task's Fisher, computed now on its
        training images."""
        super().begin_task(task_index, task)
        if task_index == 1:
            fisher = self.first_fisher
        else:
            fisher = task_fisher(self.model, task_index - 1, self.previous_task, self.samples,
                                 self.seed * 10 + task_index)
        params = dict(self.model.named_parameters())
        self.penalties.append(QuadraticPenalty(fisher, {n: params[n].detach().clone() for n in fisher}))
        self.previous_task = task

    def loss(self, new: Batch, old: Optional[Batch]) -> torch.Tensor:
        """The new task's cross-entropy plus the penalty of every earlier task (``ewc_penalty``)."""
        return super().loss(new, old) + ewc_penalty(self.model, self.penalties, self.lam)


class EWC(Method):
    """The EWC baseline (§1.6): SGD with a quadratic penalty that holds the weights each earlier task's Fisher
    marks as important."""

    name = "ewc"

    def prepare(self) -> None:
        """Compute Task A's Fisher at ``w0`` once per experiment (every run shares it) and note its size,
        scale and cost for ``info``."""
        ws = self.workspace
        start = time.perf_counter()
        model, task = ws.pretrained_model().to(ws.device), ws.source_task()
        self.fisher = task_fisher(model, 0, task, self.options["fisher_samples"], ws.config["seed"])
        values = torch.cat([f.flatten() for f in self.fisher.values()])
        self.facts = {"fisher_samples": min(self.options["fisher_samples"], len(task.train_index)),
                      "fisher_mean": values.mean().item(), "fisher_max": values.max().item(),
                      "seconds": round(time.perf_counter() - start, 1)}

    def info(self) -> dict:
        """Task A's Fisher facts (samples, mean, max, seconds) for ``results.json``."""
        return {"task_a_fisher": self.facts}

    def learner(self, model: nn.Module, run: int) -> Learner:
        """An ``EWCLearner`` with Task A's Fisher; the Fishers of later tasks are seeded by the run."""
        o = self.options
        return EWCLearner(model, o["lr"], o["lambda"], self.fisher, o["fisher_samples"],
                          self.workspace.run_seed(run))
