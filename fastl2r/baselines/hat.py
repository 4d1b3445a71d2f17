"""HAT, hard attention to the task (Serrà et al. 2018; DESIGN §1.6).

Every conv layer's output channels are gated per task: ``a_t = σ(s · e_t)``, ``e_t`` a learned
task embedding.  Where the gate sits (ours): on the output of the layer's GroupNorm, before the
ReLU and, in a block's second layer, before the residual addition, i.e. on the layer's output
units as in Serrà et al.  A gate before the GroupNorm would be undone by the normalisation (a
closed channel would come out as β, not 0).  GroupNorm mixes the channels of a group through its
statistics, so a channel that Task A uses fully still moves when a free channel of its group is
retrained: with GroupNorm, HAT's protection of old units is close but not exact.

Training a task ``t`` (Task A in pre-training, then every new task of the meta-test):
- ``s`` rises linearly from ``1/s_max`` to ``s_max`` over each epoch of the task's data, an epoch
  cut to the task's number of steps when that is shorter (ours: so that every task reaches
  ``s_max``); readouts and the cumulative masks use ``s_max``;
- loss = CE + ``c`` · Σ a_t (1 − a_<t) / Σ (1 − a_<t), ``a_<t`` the element-wise max of the
  earlier tasks' gates at ``s_max`` (zero for Task A): the attention-sparsity regulariser;
- conditioning: the gradient of a conv weight from input unit ``j`` to output unit ``i`` is
  multiplied by ``1 − min(a_<t[i], a_<t[j])``, of a GroupNorm γ/β of unit ``i`` by
  ``1 − a_<t[i]``.  An input without a gate of its own (the image, a residual sum) counts as
  fully used, so only the output gate conditions (as Serrà et al.'s first layer).  Heads are
  per task and not conditioned;
- the current embedding's gradient is compensated for the annealing,
  ``× s_max/s · (cosh(s e) + 1) / (cosh(e) + 1)`` (``s e`` clamped at ±50), and after each step
  the embedding is clamped to ±``embedding_clamp`` (6, Serrà et al.'s code).

``s_max`` = 3.0 and ``c`` = 0.75 are the paper's tuned values; the embedding clamp and the
initialisation ``e ~ N(0, 1)`` follow Serrà et al.'s code.  Task A is pre-trained with the same
rules (its own cached ``w0``, the pre-training settings of ``w0``, no weight decay on the
embeddings).  Readout (ours, the natural HAT reading): task ``k``'s representation and original
head are those of the network under task ``k``'s gates at ``s_max``; for the current task that is
its own gate, for an old task the old task's gate.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import Batch, Task, TaskSampler
from ..errors import UserError
from ..methods import Learner, Method
from ..models import BUILT_IN_ARCHITECTURES, ResNetGN
from ..supervised import head_accuracy, steps_for_epochs, warmup_cosine
from ..workspace import Workspace

COSH_CLAMP = 50.0  # Serrà et al.'s ``thres_cosh``: keeps cosh(s·e) finite


class HATNetwork(nn.Module):
    """A ``ResNetGN`` with one embedding per task over all its gated units (one per conv output
    channel); ``net(x, gates)`` is the representation under ``gates`` (flat, see ``gates``)."""

    def __init__(self, backbone: ResNetGN):
        super().__init__()
        self.backbone = backbone
        modules = dict(backbone.named_modules())
        self._in_channels = {name: m.in_channels for name, m in modules.items() if isinstance(m, nn.Conv2d)}
        self.layers = [name for name, m in backbone.named_modules() if isinstance(m, nn.GroupNorm)]
        self.units = [modules[name].num_channels for name in self.layers]
        self.embeddings = nn.ParameterList()
        self._split: Optional[tuple[torch.Tensor, ...]] = None
        for i, name in enumerate(self.layers):
            modules[name].register_forward_hook(self._gate_hook(i))
        for _ in backbone.heads:
            self._add_embedding()

    @property
    def heads(self) -> nn.ModuleList:
        """The backbone's per-task heads, so that a HAT network reads out like any multi-head network."""
        return self.backbone.heads

    def _add_embedding(self) -> None:
        ref = next(self.backbone.parameters())
        self.embeddings.append(nn.Parameter(torch.randn(sum(self.units), device=ref.device, dtype=ref.dtype)))

    def add_head(self, num_classes: int) -> int:
        """A new task: its head and its embedding; returns its index."""
        index = self.backbone.add_head(num_classes)
        self._add_embedding()
        return index

    def gates(self, task: int, s: float) -> torch.Tensor:
        """``σ(s · e_task)`` for every gated unit, flat, in ``layers`` order."""
        return torch.sigmoid(s * self.embeddings[task])

    def _gate_hook(self, index: int):
        def gate(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._split is None:
                raise RuntimeError("a HATNetwork runs under a task's gates: call net(x, gates)")
            return output * self._split[index].view(1, -1, 1, 1)
        return gate

    def forward(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The representation of ``x`` with every gated unit scaled by ``gates`` (flat, as ``gates`` returns
        them); the hooks apply them during this call only."""
        self._split = gates.split(self.units)
        try:
            return self.backbone(x)
        finally:
            self._split = None

    def cumulative_gates(self, tasks: int, s_max: float) -> Optional[torch.Tensor]:
        """``a_<tasks``: the element-wise max of tasks ``0..tasks-1``'s gates at ``s_max``, or None."""
        if tasks == 0:
            return None
        return torch.stack([self.gates(t, s_max) for t in range(tasks)]).amax(0).detach()

    def conditioning(self, used: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradient factors, by parameter name, protecting the units ``used`` (``a_<t``)."""
        by_layer = dict(zip(self.layers, used.split(self.units)))
        factors = {}
        for name in self.layers:
            out = by_layer[name]
            conv = _partner_conv(name)
            source = _input_gate(name)
            into = by_layer[source] if source is not None else out.new_ones(self._in_channels[conv])
            factors[f"backbone.{conv}.weight"] = (1 - torch.minimum(out[:, None], into[None, :]))[:, :, None, None]
            factors[f"backbone.{name}.weight"] = factors[f"backbone.{name}.bias"] = 1 - out
        return factors


class GatedView(nn.Module):
    """``net`` under fixed ``gates`` as a plain multi-head model: ``view(x)`` is the representation,
    ``view.heads`` the heads (what readouts and ``head_accuracy`` take)."""

    def __init__(self, net: HATNetwork, gates: torch.Tensor):
        super().__init__()
        self.net, self.gates = net, gates

    @property
    def heads(self) -> nn.ModuleList:
        """``net``'s heads: with them the view is a plain multi-head network for readouts and
        ``head_accuracy``."""
        return self.net.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The representation of ``x`` under the view's fixed gates."""
        return self.net(x, self.gates)


def _partner_conv(gn_name: str) -> str:
    """The conv a GroupNorm follows in ``ResNetGN``: ``gn`` → ``conv``, ``blocks.i.gn2`` → ``blocks.i.conv2``."""
    head, _, last = gn_name.rpartition(".")
    conv = last.replace("gn", "conv")
    return f"{head}.{conv}" if head else conv


def _input_gate(gn_name: str) -> Optional[str]:
    """The gated layer whose output a layer's conv reads: a block's second conv reads its first;
    the stem and a block's first conv read an input without a gate (image, residual sum)."""
    head, _, last = gn_name.rpartition(".")
    return f"{head}.gn1" if last == "gn2" else None


def sparsity(gates: torch.Tensor, used: Optional[torch.Tensor]) -> torch.Tensor:
    """Serrà et al.'s attention regulariser ``Σ a (1 − a_<t) / Σ (1 − a_<t)``."""
    free = torch.ones_like(gates) if used is None else 1 - used
    return (gates * free).sum() / free.sum().clamp_min(1e-8)


def annealed_scale(step: int, period: int, s_max: float) -> float:
    """``s`` at step ``step`` (0-based) of a task: ``1/s_max → s_max`` linearly over each ``period`` steps."""
    if period <= 1:
        return s_max
    b = step % period
    return 1 / s_max + (s_max - 1 / s_max) * b / (period - 1)


def anneal_period(task: Task, batch_size: int, steps: int) -> int:
    """Batches in one epoch of ``task``, at most ``steps``."""
    return max(1, min(math.ceil(len(task.train_index) / batch_size), steps))


class TaskAttention:
    """HAT's rules while ``net`` trains task ``task``: see the module docstring."""

    def __init__(self, net: HATNetwork, task: int, *, s_max: float, c: float, embedding_clamp: float, period: int):
        self.net, self.task = net, task
        self.s_max, self.c, self.embedding_clamp, self.period = s_max, c, embedding_clamp, period
        self.used = net.cumulative_gates(task, s_max)
        self.factors = net.conditioning(self.used) if self.used is not None else {}
        self.steps = 0

    def loss(self, batch: Batch, s: float) -> torch.Tensor:
        """Task ``task``'s cross-entropy under its gates at scale ``s``, plus ``c`` × the sparsity regulariser
        that keeps units free for later tasks."""
        gates = self.net.gates(self.task, s)
        logits = self.net.heads[self.task](self.net(batch.x, gates))
        return F.cross_entropy(logits, batch.y) + self.c * sparsity(gates, self.used)

    def adjust_gradients(self, s: float) -> None:
        """Condition the backbone's gradients on earlier tasks; compensate the embedding's for ``s``."""
        for name, p in self.net.named_parameters():
            if p.grad is not None and name in self.factors:
                p.grad.mul_(self.factors[name])
        e = self.net.embeddings[self.task]
        if e.grad is not None:
            with torch.no_grad():
                num = torch.cosh((s * e).clamp(-COSH_CLAMP, COSH_CLAMP)) + 1
                e.grad.mul_(self.s_max / s * num / (torch.cosh(e) + 1))

    def step(self, batch: Batch, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """One update on ``batch``; returns the loss."""
        s = annealed_scale(self.steps, self.period, self.s_max)
        loss = self.loss(batch, s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.adjust_gradients(s)
        optimizer.step()
        with torch.no_grad():
            self.net.embeddings[self.task].clamp_(-self.embedding_clamp, self.embedding_clamp)
        self.steps += 1
        return loss.detach()


class HATLearner(Learner):
    """Plain SGD under ``TaskAttention`` for each new task."""

    def __init__(self, model: HATNetwork, lr: float, options: dict, batch_size: int, steps_per_task: int):
        super().__init__(model)
        self.lr, self.options = lr, options
        self.batch_size, self.steps_per_task = batch_size, steps_per_task
        self.attention: Optional[TaskAttention] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def begin_task(self, task_index: int, task: Task) -> None:
        """Set up the new task's rules (``TaskAttention``: annealing over an epoch of it, the regulariser, the
        conditioning on earlier tasks' units) and a fresh plain SGD optimizer."""
        super().begin_task(task_index, task)
        o = self.options
        self.attention = TaskAttention(self.model, task_index, s_max=o["s_max"], c=o["c"],
                                       embedding_clamp=o["embedding_clamp"],
                                       period=anneal_period(task, self.batch_size, self.steps_per_task))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def step(self, new: Batch, old: Optional[Batch]) -> None:
        """One update on the new task's batch under its attention rules (HAT needs no old data: ``old`` is
        unused)."""
        self.attention.step(new, self.optimizer)

    def features(self, task_index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """Task ``task_index``'s representation: the network under that task's gates at ``s_max``."""
        return GatedView(self.model, self.model.gates(task_index, self.options["s_max"]).detach())


class HAT(Method):
    """The HAT baseline (§1.6): per-task hard attention on the conv channels, from a Task A pre-trained under
    HAT."""

    name = "hat"

    def __init__(self, workspace: Workspace, options: dict):
        super().__init__(workspace, options)
        if workspace.config["arch"] not in BUILT_IN_ARCHITECTURES:
            raise UserError(f"hat gates the layers of the ResNet-GN architectures (a gate after each conv's "
                            f"GroupNorm); {workspace.config['arch']} is not one: leave hat out with --methods")

    def network(self) -> HATNetwork:
        """A HAT network with Task A's head and embedding (weights not loaded)."""
        ws = self.workspace
        return HATNetwork(ws.new_model([ws.source_task().num_classes]))

    def pretrained_state(self) -> dict:
        """Task A pre-trained under HAT (cached like ``w0``, keyed also by the HAT options)."""
        ws = self.workspace
        index = ws.metatest_checkpoint
        o = self.options

        def build() -> dict:
            task, p = ws.source_task(), ws.config["pretrain"]
            seed = ws.config["seed"] * 1000 + index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                net = self.network()
            steps = steps_for_epochs([task], p["epochs"], p["batch_size"])
            start = time.perf_counter()
            attention = TaskAttention(net, 0, s_max=o["s_max"], c=o["c"], embedding_clamp=o["embedding_clamp"],
                                      period=anneal_period(task, p["batch_size"], steps))
            backbone = [q for n, q in net.named_parameters() if not n.startswith("embeddings.")]
            optimizer = torch.optim.SGD([{"params": backbone, "weight_decay": p["weight_decay"]},
                                         {"params": list(net.embeddings), "weight_decay": 0.0}],
                                        lr=p["lr"], momentum=p["momentum"])
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: warmup_cosine(s, steps, p["warmup_fraction"]))
            sampler = TaskSampler([task], p["batch_size"], device=ws.device, seed=seed)
            bar = tqdm(range(steps), desc=f"pre-training HAT w0 on {task.name}", disable=not ws.progress,
                       leave=False, dynamic_ncols=True)
            for step in bar:
                loss = attention.step(sampler.sample(), optimizer)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"HAT pre-training: the loss became {loss.item()} at step {step}")
                schedule.step()
            gates = net.gates(0, o["s_max"]).detach()
            return {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "task": task.name, "steps": steps,
                    "seconds": round(time.perf_counter() - start, 1),
                    "test_accuracy": head_accuracy(GatedView(net, gates), task, 0, ws.device),
                    "task_a_units_used": (gates > 0.5).float().mean().item()}

        extra = {k: o[k] for k in ("s_max", "c", "embedding_clamp")}
        return ws.cached_state("hat_w0", index, build, extra=extra)

    def prepare(self) -> None:
        """Pre-train Task A under HAT once per experiment (or load it from the cache) and keep its facts for
        ``info``."""
        state = self.pretrained_state()
        self.facts = {k: v for k, v in state.items() if k != "model"}

    def info(self) -> dict:
        """The HAT pre-training's facts (steps, time, Task A accuracy, share of units used) for
        ``results.json``."""
        return {"task_a_pretraining": self.facts}

    def initial_model(self, run: int) -> nn.Module:
        """A HAT network holding the HAT-pre-trained Task A (HAT's own ``w0``), which every run starts from."""
        net = self.network()
        net.load_state_dict(self.pretrained_state()["model"])
        return net

    def learner(self, model: nn.Module, run: int) -> Learner:
        """A ``HATLearner``; the meta-test's batch size and steps per task set its annealing period."""
        m = self.workspace.config["metatest"]
        return HATLearner(model, self.options["lr"], self.options, m["batch_size"], m["steps_per_task"])

