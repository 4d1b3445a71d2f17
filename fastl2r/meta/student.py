"""The student of Algorithm 1 in functional form.

Its meta-learned weights are the grouped ``[R, K]`` tensors of ``MetaLearner`` and
stay in the autograd graph across the inner steps of a T-BPTT window; the other
tensors (heads, biases) are plain values updated by SGD.  ``skeleton`` is a module
of the same architecture used only through ``torch.func.functional_call``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..models.taps import ActivationTaps, is_head
from ..profiling import nvtx_range
from .metalearner import MetaLearner, MetaState, Theta


class FunctionalStudent:
    def __init__(self, skeleton: nn.Module, meta: MetaLearner, taps: Optional[ActivationTaps] = None):
        self.skeleton = skeleton
        self.meta = meta
        self.taps = taps or ActivationTaps(skeleton, meta.head_prefix)
        self.flats: list[torch.Tensor] = []
        self.plain: dict[str, torch.Tensor] = {}

    def load(self, model: nn.Module) -> None:
        """Take ``model``'s current values (detached) as the student's weights."""
        tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.flats = self.meta.flatten(tensors)
        self.plain = {n: tensors[n] for n in self.meta.plain_names(tensors)}

    def add_head(self, weight: torch.Tensor, bias: torch.Tensor) -> int:
        index = sum(1 for n in self.plain if is_head(n, self.meta.head_prefix) and n.endswith(".weight"))
        self.plain[f"{self.meta.head_prefix}.{index}.weight"] = weight.detach().clone()
        self.plain[f"{self.meta.head_prefix}.{index}.bias"] = bias.detach().clone()
        return index

    def _body(self, flats, plain) -> dict[str, torch.Tensor]:
        body = {n: t for n, t in plain.items() if not is_head(n, self.meta.head_prefix)}
        return {**self.meta.unflatten(flats), **body}

    def represent(self, x: torch.Tensor, flats=None, plain=None) -> torch.Tensor:
        """The representation ``h`` under the given (default: current) weights."""
        return functional_call(self.skeleton, self._body(flats or self.flats, plain or self.plain), (x,))

    def logits(self, h: torch.Tensor, task: int, plain=None) -> torch.Tensor:
        plain = plain or self.plain
        prefix = f"{self.meta.head_prefix}.{task}"
        return F.linear(h, plain[prefix + ".weight"], plain[prefix + ".bias"])

    def learn(self, x: torch.Tensor, y: torch.Tensor, task: int, state: MetaState, lr: float,
              theta: Optional[Theta] = None) -> tuple[MetaState, list[torch.Tensor], torch.Tensor]:
        """One student step on a batch of task ``task``: its gradient ``ĝ`` and activation
        means are constants; the meta-learner updates the grouped weights (kept in the graph)
        and plain SGD the rest.  Returns the new meta state, the δ per group and the loss."""
        leaves = [f.detach().requires_grad_() for f in self.flats]
        plain_leaves = {n: t.detach().requires_grad_() for n, t in self.plain.items()}
        with nvtx_range("student_grad"):
            with torch.enable_grad():
                with self.taps.record():
                    h = self.represent(x, leaves, plain_leaves)
                loss = F.cross_entropy(self.logits(h, task, plain_leaves), y)
                grads = torch.autograd.grad(loss, leaves + list(plain_leaves.values()), allow_unused=True)
            means = self.taps.means()
            self.taps.clear()
        with nvtx_range("meta_update"):
            flat_grads = [g if g is not None else torch.zeros_like(f) for g, f in zip(grads, leaves)]
            self.flats, state, deltas = self.meta.step(self.flats, flat_grads, means, state, theta)
            for (name, value), g in zip(self.plain.items(), grads[len(leaves):]):
                if g is not None:
                    self.plain[name] = value.detach() - lr * g
        return state, deltas, loss.detach()

    def truncate(self) -> None:
        """Detach the weights from the graph (a T-BPTT truncation)."""
        self.flats = [f.detach() for f in self.flats]
