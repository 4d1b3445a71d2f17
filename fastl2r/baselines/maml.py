"""MAML as Javed & White (2019) use it for continual learning, adapted by the paper (DESIGN §1.6):
meta-learn the backbone so that a linear head trained by a few SGD steps on a new task works well.

Meta-training starts from ``w0``.  Each iteration draws a meta-training task (as Algorithm 1 does:
Experiment 1's Task B1 images, else classes drawn from the meta-training pool; in Experiment 5
one 10-way task of its pool), a support and a query batch of it (``batch_size`` each, augmented);
a fresh zero-initialised linear head (ours: zero is the neutral start of a softmax layer) takes
``inner_steps`` = 10 SGD steps at ``inner_lr`` on the support features; the query loss under the
adapted head is back-propagated into the backbone through the unrolled steps, second order
(``create_graph=True``: the adapted head depends on the support features), and Adam at
``meta_lr`` updates the backbone (the heads are left as they are).  The backbone is cached.
Meta-test: the SGD protocol (``lr``) from the meta-learned backbone and ``w0``'s Task-A head.

Choices of ours: ``inner_lr`` = 0.1 (the SGD protocol's rate), support and query batches of the
meta-test batch size, ``meta_iterations`` per preset (``PRESET_VALUES`` in experiments.py), and
``meta_lr`` = 1e-3, chosen once on the meta-training split, never on meta-test: after 200
iterations of Experiment 1 (fmnist suite, quick preset) from ``w0``, the query accuracy of the
10-step head on 30 held-out support/query draws of the meta-training images was 24% at ``w0``,
75% with 1e-4, 91% with 1e-3, and 3e-3 diverged (query loss 27).
"""
from __future__ import annotations

import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Batch, TaskSampler
from .sgd import SGDFromBackbone


def adapted_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int,
                 lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A zero-initialised linear head after ``steps`` SGD steps on ``(features, labels)``, kept in
    the autograd graph (``create_graph``) so that it is a differentiable function of ``features``."""
    weight = features.new_zeros(num_classes, features.shape[1], requires_grad=True)
    bias = features.new_zeros(num_classes, requires_grad=True)
    for _ in range(steps):
        loss = F.cross_entropy(F.linear(features, weight, bias), labels)
        grad_w, grad_b = torch.autograd.grad(loss, (weight, bias), create_graph=True)
        weight, bias = weight - lr * grad_w, bias - lr * grad_b
    return weight, bias


def query_loss(backbone: nn.Module, support: Batch, query: Batch, num_classes: int, steps: int,
               lr: float) -> torch.Tensor:
    """MAML's outer loss: the query cross-entropy of the head adapted on the support set."""
    h = backbone(torch.cat([support.x, query.x]))
    h_support, h_query = h.split([support.x.shape[0], query.x.shape[0]])
    weight, bias = adapted_head(h_support, support.y, num_classes, steps, lr)
    return F.cross_entropy(F.linear(h_query, weight, bias), query.y)


class MAML(SGDFromBackbone):
    """The MAML baseline (§1.6): a backbone meta-learned so that a linear head adapts in a few SGD steps, then
    the SGD protocol."""

    name = "maml"
    facts_key = "metatrain"

    def cache_key(self) -> dict:
        """The meta-training tasks and every MAML option but the meta-test ``lr``: what the cached backbone
        depends on beyond ``w0``."""
        return {"meta_train": self.workspace.config["tasks"]["meta_train"],
                "maml": {k: v for k, v in self.options.items() if k != "lr"}}

    def build_backbone(self, index: int) -> dict:
        """Meta-train the backbone of pre-trained checkpoint ``index`` (see the module docstring); returns it
        with the iterations, the time and the first and final query losses."""
        ws, o = self.workspace, self.options
        model = ws.pretrained_model(index).to(ws.device)
        params = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
        optimizer = torch.optim.Adam(params, lr=o["meta_lr"])
        spec = ws.config["tasks"]["meta_train"][0]
        seed = ws.config["seed"] * 1_000_003 + index
        start, losses = time.perf_counter(), []
        bar = tqdm(range(o["meta_iterations"]), desc="meta-training MAML", disable=not ws.progress,
                   leave=False, dynamic_ncols=True)
        for iteration in bar:
            rng = random.Random(seed + iteration)
            task = ws.task(spec, ws.draw_classes([spec], rng)[0])
            sampler = TaskSampler([task], o["batch_size"], device=ws.device, seed=seed + iteration)
            loss = query_loss(model, sampler.sample(), sampler.sample(), task.num_classes,
                              o["inner_steps"], o["inner_lr"])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"MAML meta-training: the query loss became {loss.item()} "
                                         f"at iteration {iteration}; lower methods.maml.meta_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        tail = losses[-max(1, len(losses) // 10):]
        return {"model": {k: v.cpu() for k, v in model.state_dict().items()},
                "iterations": o["meta_iterations"], "seconds": round(time.perf_counter() - start, 1),
                "first_query_loss": losses[0], "final_query_loss": sum(tail) / len(tail)}
