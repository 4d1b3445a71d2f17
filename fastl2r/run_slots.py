"""Meta-test runs as slots of one folded network (DESIGN §6, ``--parallel-runs``).

R runs of one method train side by side: run r's network is slot r of the Slot layers of
``models.resnet`` (weights folded into the channels, heads ``[R, classes, D + 1]``), so a
meta-test step of R runs costs the dispatches of one.  Each run keeps its own network object
for what is not a training step: its new heads are drawn in it, under that run's own RNG
(``RunRNGs``), exactly as the run alone draws them, and its readouts read its features;
``SlotNetwork.write_back`` copies the folded weights into those networks before a readout.
A run's results are the one-by-one run's up to float round-off (grouped and plain
convolutions sum in other orders).
"""
from __future__ import annotations

import abc
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .data import Batch
from .meta.unroll import fold, head_logits, sgd_step

HEADS = "heads."


class RunRNGs:
    """Each run's own global RNG (the CPU's and, on CUDA, the device's), seeded as a run alone is seeded
    (``ws.run_seed``): what is drawn under ``use(run)`` is what that run, alone, would draw there."""

    def __init__(self, seeds: dict[int, int], device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.states = {}
        for run, seed in seeds.items():
            with torch.random.fork_rng(devices=self.devices):
                torch.manual_seed(seed)
                self.states[run] = self._get()

    def _get(self) -> tuple:
        return torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in self.devices)

    @contextmanager
    def use(self, run: int) -> Iterator[None]:
        """Inside the block the global RNG is ``run``'s; its draws advance that run's state only."""
        with torch.random.fork_rng(devices=self.devices):
            cpu, *cuda = self.states[run]
            torch.set_rng_state(cpu)
            for d, state in zip(self.devices, cuda):
                torch.cuda.set_rng_state(state, d)
            yield
            self.states[run] = self._get()


def stack(batches: Sequence[Batch]) -> Batch:
    """One batch of R slots (a leading slot axis) from the runs' own batches."""
    return Batch(*(torch.stack([getattr(b, f) for b in batches]) for f in ("x", "y", "task")))


class SlotNetwork:
    """The networks of R runs (``models``, one architecture whose layers fold slots) as one folded network:
    ``weights`` (non-head tensors, ``[R·C, ...]``) and ``heads`` (per task ``[R, classes, D + 1]``)."""

    def __init__(self, models: Sequence[nn.Module]):
        self.models = list(models)
        self.skeleton = self.models[0]
        self.slots = len(self.models)
        names = [n for n, _ in self.skeleton.named_parameters() if not n.startswith(HEADS)]
        own = [dict(m.named_parameters()) for m in self.models]
        self.weights = {n: torch.cat([p[n].detach() for p in own]) for n in names}
        self.heads: list[torch.Tensor] = []
        while len(self.heads) < len(self.skeleton.heads):
            self.add_head()

    def add_head(self) -> None:
        """Fold the runs' next head (each drawn in its own network, ``model.add_head``)."""
        task = len(self.heads)
        self.heads.append(torch.stack([torch.cat([m.heads[task].weight, m.heads[task].bias[:, None]], 1).detach()
                                       for m in self.models]))

    def represent(self, x: torch.Tensor, weights: Optional[dict[str, torch.Tensor]] = None) -> torch.Tensor:
        """``h [N, R, D]`` of the R networks (with ``weights`` if given) on ``x [R, N, C, H, W]``."""
        h = functional_call(self.skeleton, weights if weights is not None else self.weights, (fold(x),))
        return h.view(h.shape[0], self.slots, -1)

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy each slot's weights and heads into its run's network (before a readout)."""
        for r, model in enumerate(self.models):
            params = dict(model.named_parameters())
            for name, w in self.weights.items():
                params[name].copy_(w.view(self.slots, -1, *w.shape[1:])[r])
            for head, folded in zip(model.heads, self.heads):
                head.weight.copy_(folded[r, :, :-1])
                head.bias.copy_(folded[r, :, -1])


def new_task_loss(network: SlotNetwork, h: torch.Tensor, heads: Sequence[torch.Tensor], task: int,
                  y: torch.Tensor) -> torch.Tensor:
    """``[R]``: each run's mean cross-entropy of its new-task batch through its head ``task``."""
    logits = head_logits(h, heads[task])
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(network.slots, -1).mean(1)


class SlotLearner(abc.ABC):
    """What ``Learner`` is to one run, for the R runs of a ``SlotNetwork``: trains every slot on its run's
    new tasks, one after another; each slot's step is its run's ``Learner.step``."""

    def __init__(self, network: SlotNetwork):
        self.network = network
        self.task_index = 0

    def begin_task(self, task_index: int) -> None:
        """A new task starts; its fresh heads are ``network.heads[task_index]``."""
        self.task_index = task_index

    @abc.abstractmethod
    def step(self, new: Batch, old: Optional[Batch]) -> None:
        """One update of every slot on its run's batch (a leading slot axis; ``old`` if the method asks)."""


class SlotSGD(SlotLearner):
    """``SGDLearner`` for R runs: plain SGD (no momentum) of every tensor that gets a gradient, on the
    per-run ``loss`` (the new task's cross-entropy; subclasses add their terms)."""

    def __init__(self, network: SlotNetwork, lr: float):
        super().__init__(network)
        self.lr = lr

    def loss(self, weights: dict[str, torch.Tensor], heads: list[torch.Tensor], new: Batch,
             old: Optional[Batch]) -> torch.Tensor:
        """``[R]``: each run's loss, computed through ``weights`` and ``heads``."""
        return new_task_loss(self.network, self.network.represent(new.x, weights), heads, self.task_index, new.y)

    def step(self, new: Batch, old: Optional[Batch]) -> None:
        """One SGD step of every slot on its run's ``loss`` (their sum: a slot's gradient is its own)."""
        net = self.network
        with torch.enable_grad():
            weights = {n: w.requires_grad_() for n, w in net.weights.items()}
            heads = [h.requires_grad_() for h in net.heads]
            leaves = list(weights.values()) + heads
            grads = torch.autograd.grad(self.loss(weights, heads, new, old).sum(), leaves, allow_unused=True)
        n = len(weights)
        stepped = sgd_step(leaves, self.directions(weights, grads[:n]) + list(grads[n:]), self.lr)
        net.weights, net.heads = dict(zip(weights, stepped)), stepped[n:]

    def directions(self, weights: dict[str, torch.Tensor],
                   grads: Sequence[Optional[torch.Tensor]]) -> list[Optional[torch.Tensor]]:
        """What the step subtracts (× ``lr``) from the non-head ``weights``, given their gradients: the
        gradients themselves (SGD; a learned rule rescales them)."""
        return list(grads)
