"""Algorithm 1's inner step as a pure function of explicit state, for S episode slots at once
(DESIGN §1.4, §6).

``Unroll.step(theta, state) -> (state, losses)`` reads nothing but its arguments and the
unchanging context held by ``Unroll`` (network skeleton, meta-learner layout, sampler,
hyperparameters): no module is mutated, no hook outlives the call, nothing is read back to
the host.  A slot is one episode: its teacher and student weights, meta-LSTM states, heads,
sampling sets, counters and threshold sit on a leading slot axis — folded into the channels
for the networks (``fastl2r.models.resnet``), into the rows for the meta-learner's ops — so
S slots cost the dispatches of one.

A slot that stops (loss over its threshold, horizon, non-finite) goes *idle* on the device:
its losses no longer count and its weights stop changing (its learning losses are multiplied
by ``active``, so its gradients are zero), until the trainer resets it at the next window
start — so every episode starts at a T-BPTT window boundary, as in Algorithm 1.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..data.sampler import Batch, SamplingSet, SlotSampler
from ..profiling import nvtx_range
from .metalearner import MetaLearner, MetaState, TappedLayer, Theta, activation_means, record_activations

RUNNING, THRESHOLD, HORIZON, NONFINITE = 0, 1, 2, 3
END_REASONS = {THRESHOLD: "threshold", HORIZON: "horizon", NONFINITE: "nonfinite"}
OBJECTIVES = ("huber", "huber_centred", "huber_standardised")
STANDARDISE_EPS = 1e-5


@dataclass
class SlotState:
    """Everything an inner step reads and advances, for S slots (one episode each).

    Weights are grouped like ``MetaLearner.flatten`` (``[S·R, K]`` per group, slot layout of the
    ops) and ``plain`` holds the other non-head tensors folded (``[S·C, ...]``); heads are per task
    ``[S, classes, D + 1]`` (weight, then bias).  ``old_sets``/``new_sets`` give, per phase (new
    task), what the teacher's old-task batch and both networks' new-task batch are drawn from.
    """

    teacher: list[torch.Tensor]
    teacher_plain: dict[str, torch.Tensor]
    teacher_heads: list[torch.Tensor]
    student: list[torch.Tensor]
    student_plain: dict[str, torch.Tensor]
    student_heads: list[torch.Tensor]
    lstm: MetaState
    old_sets: SamplingSet        # [S, phases, M]
    new_sets: SamplingSet
    key: torch.Tensor            # [S] int64: the episode's seed, the key of its batches
    active: torch.Tensor         # [S] bool
    phase: torch.Tensor          # [S] int64: which new task (Experiment 5 has two)
    steps: torch.Tensor          # [S] int64: inner steps of the episode so far
    phase_steps: torch.Tensor    # [S] int64: inner steps on the current new task
    threshold: torch.Tensor      # [S]: the loss that ends the current phase
    ended: torch.Tensor          # [S] int64: why the slot stopped (RUNNING while it runs)

    def detach(self) -> "SlotState":
        """A T-BPTT truncation: the same values, cut from the graph."""
        return replace(self, student=[w.detach() for w in self.student], lstm=self.lstm.detach())

    @property
    def slots(self) -> int:
        """S, the number of slots (episodes) the state holds."""
        return self.key.shape[0]

    def split(self, group_rows: Sequence[Sequence[int]]) -> list["SlotState"]:
        """One single-slot state per slot (``group_rows``: per group, one slot's rows of each tensor)."""
        return [self.select(group_rows, [s]) for s in range(self.slots)]

    def select(self, group_rows: Sequence[Sequence[int]], which: Sequence[int]) -> "SlotState":
        """The state of the slots ``which``, in that order, as a state of ``len(which)`` slots."""
        S = self.slots
        index = torch.tensor(list(which), device=self.key.device)
        rows = [_slot_positions(r, S, which, self.key.device) for r in group_rows]

        def per_slot(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

        def folded(t: torch.Tensor) -> torch.Tensor:
            return t.view(S, -1, *t.shape[1:]).index_select(0, index).flatten(0, 1)

        return SlotState(
            teacher=[w.index_select(0, r) for w, r in zip(self.teacher, rows)],
            teacher_plain={n: folded(t) for n, t in self.teacher_plain.items()},
            teacher_heads=[per_slot(h) for h in self.teacher_heads],
            student=[w.index_select(0, r) for w, r in zip(self.student, rows)],
            student_plain={n: folded(t) for n, t in self.student_plain.items()},
            student_heads=[per_slot(h) for h in self.student_heads],
            lstm=MetaState([h.index_select(1, r) for h, r in zip(self.lstm.h, rows)],
                           [c.index_select(1, r) for c, r in zip(self.lstm.c, rows)]),
            old_sets=SamplingSet(*(per_slot(t) for t in (self.old_sets.rows, self.old_sets.task, self.old_sets.label))),
            new_sets=SamplingSet(*(per_slot(t) for t in (self.new_sets.rows, self.new_sets.task, self.new_sets.label))),
            **{f: per_slot(getattr(self, f)) for f in ("key", "active", "phase", "steps", "phase_steps", "threshold",
                                                        "ended")})

    def put(self, group_rows: Sequence[Sequence[int]], which: Sequence[int], values: "SlotState") -> "SlotState":
        """This state with slots ``which`` replaced by ``values`` (a state of ``len(which)`` slots):
        masked writes on the device, the other slots untouched."""
        S, n = self.slots, len(which)
        index = torch.tensor(list(which), device=self.key.device)
        rows = [_slot_positions(r, S, which, self.key.device) for r in group_rows]

        def per_slot(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return t.index_copy(0, index, v.to(t.dtype))

        def folded(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return t.view(S, -1, *t.shape[1:]).index_copy(0, index, v.view(n, -1, *v.shape[1:])).view_as(t)

        def sets(old: SamplingSet, new: SamplingSet) -> SamplingSet:
            return SamplingSet(per_slot(old.rows, new.rows), per_slot(old.task, new.task), per_slot(old.label, new.label))

        return SlotState(
            teacher=[w.index_copy(0, r, v) for w, r, v in zip(self.teacher, rows, values.teacher)],
            teacher_plain={k: folded(t, values.teacher_plain[k]) for k, t in self.teacher_plain.items()},
            teacher_heads=[per_slot(h, v) for h, v in zip(self.teacher_heads, values.teacher_heads)],
            student=[w.index_copy(0, r, v) for w, r, v in zip(self.student, rows, values.student)],
            student_plain={k: folded(t, values.student_plain[k]) for k, t in self.student_plain.items()},
            student_heads=[per_slot(h, v) for h, v in zip(self.student_heads, values.student_heads)],
            lstm=MetaState([h.index_copy(1, r, v) for h, r, v in zip(self.lstm.h, rows, values.lstm.h)],
                           [c.index_copy(1, r, v) for c, r, v in zip(self.lstm.c, rows, values.lstm.c)]),
            old_sets=sets(self.old_sets, values.old_sets), new_sets=sets(self.new_sets, values.new_sets),
            **{f: per_slot(getattr(self, f), getattr(values, f)) for f in ("key", "active", "phase", "steps",
                                                                           "phase_steps", "threshold", "ended")})

    @staticmethod
    def join(states: Sequence["SlotState"], group_rows: Sequence[Sequence[int]]) -> "SlotState":
        """The states of several slots (each any number of them) as one, slots in order."""
        def grouped(tensors: list[torch.Tensor], rows: Sequence[int], dim: int = 0) -> torch.Tensor:
            # tensor by tensor, the blocks of every state's slots
            blocks = [t.split([t.shape[dim] // sum(rows) * r for r in rows], dim) for t in tensors]
            return torch.cat([block for per_tensor in zip(*blocks) for block in per_tensor], dim)

        def cat(values: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(values)

        first = states[0]
        return SlotState(
            teacher=[grouped([st.teacher[g] for st in states], r) for g, r in enumerate(group_rows)],
            teacher_plain={n: cat([st.teacher_plain[n] for st in states]) for n in first.teacher_plain},
            teacher_heads=[cat([st.teacher_heads[t] for st in states]) for t in range(len(first.teacher_heads))],
            student=[grouped([st.student[g] for st in states], r) for g, r in enumerate(group_rows)],
            student_plain={n: cat([st.student_plain[n] for st in states]) for n in first.student_plain},
            student_heads=[cat([st.student_heads[t] for st in states]) for t in range(len(first.student_heads))],
            lstm=MetaState([grouped([st.lstm.h[g] for st in states], r, 1) for g, r in enumerate(group_rows)],
                           [grouped([st.lstm.c[g] for st in states], r, 1) for g, r in enumerate(group_rows)]),
            old_sets=SamplingSet(*(cat([getattr(st.old_sets, f) for st in states]) for f in ("rows", "task", "label"))),
            new_sets=SamplingSet(*(cat([getattr(st.new_sets, f) for st in states]) for f in ("rows", "task", "label"))),
            **{f: cat([getattr(st, f) for st in states]) for f in ("key", "active", "phase", "steps", "phase_steps",
                                                                    "threshold", "ended")})

    def tensors(self) -> dict:
        """The state as plain dicts and lists of tensors (for checkpoints)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lstm"] = {"h": self.lstm.h, "c": self.lstm.c}
        for name in ("old_sets", "new_sets"):
            out[name] = {f.name: getattr(out[name], f.name) for f in fields(SamplingSet)}
        return out

    @staticmethod
    def from_tensors(tree: dict) -> "SlotState":
        """The state that ``tensors()`` gave as plain dicts and lists (a checkpoint's slot)."""
        tree = dict(tree)
        tree["lstm"] = MetaState(tree["lstm"]["h"], tree["lstm"]["c"])
        for name in ("old_sets", "new_sets"):
            tree[name] = SamplingSet(**tree[name])
        return SlotState(**tree)


def _slot_positions(rows: Sequence[int], slots: int, which: Sequence[int], device) -> torch.Tensor:
    """Positions, in a group of ``slots`` slots, of the rows of slots ``which``: tensor by tensor,
    then slot by slot (the ops' slot layout of ``len(which)`` slots)."""
    positions, start = [], 0
    for r in rows:
        positions += [start + s * r + torch.arange(r, device=device) for s in which]
        start += slots * r
    return torch.cat(positions)


def fold(x: torch.Tensor) -> torch.Tensor:
    """``[S, N, C, H, W]`` slot batches -> the networks' folded input ``[N, S·C, H, W]``."""
    slots, n = x.shape[:2]
    return x.transpose(0, 1).reshape(n, slots * x.shape[2], *x.shape[3:])


def head_logits(h: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``[S, N, classes]`` logits of per-slot heads ``[S, classes, D + 1]`` on ``h [N, S, D]``."""
    return torch.einsum("nsd,scd->snc", h, head[..., :-1]) + head[:, None, :, -1]


def slot_cross_entropy(h: torch.Tensor, heads: Sequence[torch.Tensor], y: torch.Tensor,
                       task: torch.Tensor) -> torch.Tensor:
    """``[S]``: per slot, the mean cross-entropy of every example under its own task's head."""
    total = h.new_zeros(task.shape[0])
    for t, head in enumerate(heads):
        logits = head_logits(h, head)
        member = task == t
        ce = F.cross_entropy(logits.flatten(0, 1), torch.where(member, y, 0).flatten(), reduction="none")
        total = total + torch.where(member, ce.view_as(y), 0).sum(1)
    return total / task.shape[1]


def sgd_step(values: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]], lr: float) -> list[torch.Tensor]:
    """Plain SGD (no momentum, ``torch.optim.SGD``'s ``p − lr·g``) of every tensor with a gradient, out of the
    graph, in one multi-tensor op however deep the network; the others come back detached, unchanged."""
    stepped = [i for i, g in enumerate(grads) if g is not None]
    with torch.no_grad():
        new = torch._foreach_add([values[i] for i in stepped], [grads[i] for i in stepped], alpha=-lr)
    out = [v.detach() for v in values]
    for i, value in zip(stepped, new):
        out[i] = value
    return out


def representation_loss(student: torch.Tensor, teacher: torch.Tensor, objective: str) -> torch.Tensor:
    """``[S]``: per slot, the Huber loss (δ = 1, mean) between representations ``[N, S, D]``.

    ``huber`` is the paper's, on the raw representations.  The variants (ours) first remove
    what a linear readout with a bias ignores: ``huber_centred`` subtracts each network's batch
    mean per feature, ``huber_standardised`` also divides by its batch standard deviation; a
    rule then cannot meet the objective by only cancelling the student's mean shift.
    """
    if objective != "huber":
        student = student - student.mean(0, keepdim=True)
        teacher = teacher - teacher.mean(0, keepdim=True)
        if objective == "huber_standardised":
            student = student / (student.std(0, keepdim=True) + STANDARDISE_EPS)
            teacher = teacher / (teacher.std(0, keepdim=True) + STANDARDISE_EPS)
    return F.huber_loss(student, teacher, reduction="none", delta=1.0).mean(dim=(0, 2))


def select_phase(sets: SamplingSet, phase: torch.Tensor) -> SamplingSet:
    """Each slot's ``[S, M]`` set of its current phase, from ``[S, phases, M]``."""
    if sets.rows.shape[1] == 1:
        return SamplingSet(sets.rows[:, 0], sets.task[:, 0], sets.label[:, 0])
    index = phase[:, None, None].expand(-1, 1, sets.rows.shape[2])
    return SamplingSet(*(t.gather(1, index).squeeze(1) for t in (sets.rows, sets.task, sets.label)))


class Unroll:
    """Algorithm 1's inner step for ``slots`` episode slots (the context the pure step reads).

    ``skeleton`` is a network of the student's architecture used only through
    ``functional_call``; with S > 1 its layers must fold slots (``models.runs_slots``).
    """

    def __init__(self, skeleton: nn.Module, meta: MetaLearner, sampler: SlotSampler, layers: list[TappedLayer], *,
                 slots: int, lr: float, loss_scale: float, horizon: int, phases: int, objective: str = "huber"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
        self.skeleton, self.meta, self.sampler, self.layers = skeleton, meta, sampler, layers
        self.slots, self.lr, self.loss_scale = slots, lr, loss_scale
        self.horizon, self.phases, self.objective = horizon, phases, objective

    def represent(self, weights: Sequence[torch.Tensor], plain: dict[str, torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor:
        """``h [N, S, D]`` of the S networks with grouped ``weights`` on folded ``x``."""
        params = {**self.meta.unflatten(weights, self.slots), **plain}
        h = functional_call(self.skeleton, params, (x,))
        return h.view(h.shape[0], self.slots, -1)

    def batches(self, state: SlotState) -> tuple[Batch, Batch]:
        """This step's old-task and new-task batches of every slot (keyed by episode and step)."""
        old = self.sampler.sample(select_phase(state.old_sets, state.phase), state.key, state.steps, stream=0)
        new = self.sampler.sample(select_phase(state.new_sets, state.phase), state.key, state.steps, stream=1)
        return old, new

    def step(self, theta: Theta, state: SlotState) -> tuple[SlotState, torch.Tensor]:
        """One inner step of every slot: returns the advanced state (counters untouched, see
        ``finish``) and the per-slot meta-loss ``λ·Huber(h, ĥ)`` ``[S]``, in the graph."""
        old, new = self.batches(state)
        dtype = state.teacher[0].dtype
        old.x, new.x = old.x.to(dtype), new.x.to(dtype)
        active = state.active.to(dtype)
        x_both = fold(torch.cat([old.x, new.x], dim=1))
        y_both = torch.cat([old.y, new.y], dim=1)
        task_both = torch.cat([old.task, new.task], dim=1)
        with nvtx_range("teacher_step"), torch.enable_grad():
            teacher = [w.detach().requires_grad_() for w in state.teacher]
            plain = {n: t.detach().requires_grad_() for n, t in state.teacher_plain.items()}
            heads = [head.detach().requires_grad_() for head in state.teacher_heads]
            loss = (slot_cross_entropy(self.represent(teacher, plain, x_both), heads, y_both, task_both)
                    * active).sum()
            grads = torch.autograd.grad(loss, teacher + list(plain.values()) + heads, allow_unused=True)
        teacher, teacher_plain, teacher_heads = self._sgd(teacher, plain, heads, grads)
        with nvtx_range("student_grad"), torch.enable_grad():
            leaves = [w.detach().requires_grad_() for w in state.student]
            plain = {n: t.detach().requires_grad_() for n, t in state.student_plain.items()}
            heads = [head.detach().requires_grad_() for head in state.student_heads]
            with record_activations(self.skeleton, self.layers) as activations:
                h_new = self.represent(leaves, plain, fold(new.x))
            loss = (self._new_task_loss(h_new, heads, new.y, state.phase) * active).sum()
            grads = torch.autograd.grad(loss, leaves + list(plain.values()) + heads, allow_unused=True)
            means = activation_means(self.layers, activations)
        with nvtx_range("meta_update"):
            flat_grads = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, leaves)]
            student, lstm, _ = self.meta.step(state.student, flat_grads, means, state.lstm, theta)
            _, student_plain, student_heads = self._sgd([], plain, heads, grads[len(leaves):])
        with nvtx_range("meta_loss"):
            with torch.no_grad():
                target = self.represent(teacher, teacher_plain, x_both)
            h_student = self.represent(student, student_plain, x_both)
            losses = self.loss_scale * representation_loss(h_student, target, self.objective)
        return replace(state, teacher=teacher, teacher_plain=teacher_plain, teacher_heads=teacher_heads,
                       student=student, student_plain=student_plain, student_heads=student_heads,
                       lstm=lstm), losses

    def _new_task_loss(self, h: torch.Tensor, heads: Sequence[torch.Tensor], y: torch.Tensor,
                       phase: torch.Tensor) -> torch.Tensor:
        """``[S]``: the student's cross-entropy on its current new task (head 1 + phase)."""
        loss = h.new_zeros(phase.shape[0])
        for p in range(self.phases):
            ce = F.cross_entropy(head_logits(h, heads[1 + p]).flatten(0, 1), y.flatten(), reduction="none")
            loss = torch.where(phase == p, ce.view_as(y).mean(1), loss)
        return loss

    def _sgd(self, weights: list, plain: dict, heads: list, grads: Sequence[Optional[torch.Tensor]]):
        """``sgd_step`` of the weights, plain tensors and heads, split back into those three."""
        values = sgd_step(weights + list(plain.values()) + heads, grads, self.lr)
        n = len(weights)
        return values[:n], dict(zip(plain, values[n:n + len(plain)])), values[n + len(plain):]

    def finish(self, state: SlotState, losses: torch.Tensor, gradient_finite: torch.Tensor,
               nonfinite_loss: torch.Tensor) -> tuple[SlotState, torch.Tensor]:
        """Advance the counters after the meta-update; slots whose phase ends move to the next new
        task (Experiment 5: the threshold rises by 5) or stop.  Also returns which slots' losses
        entered the meta-gradient and were kept (``[S]`` bool).

        A slot whose loss is not finite stops ("nonfinite"); if θ's gradient is not finite and no
        slot's loss explains it (``nonfinite_loss``: any slot of the job), every slot that counted
        stops so."""
        active = state.active
        finite = torch.isfinite(losses)
        counted = active & finite
        blamed = (active & ~finite) | (counted & ~gradient_finite & ~nonfinite_loss)
        steps = state.steps + active
        phase_steps = state.phase_steps + active
        crossed = counted & ~blamed & (losses > state.threshold)
        at_horizon = active & ~blamed & (phase_steps >= self.horizon)
        advance = crossed | at_horizon
        last = state.phase >= self.phases - 1
        switch = advance & ~last
        stop = blamed | (advance & last)
        ended = torch.where(blamed, NONFINITE, torch.where(crossed, THRESHOLD, HORIZON))
        return replace(state, steps=steps, phase=state.phase + switch,
                       phase_steps=torch.where(switch, 0, phase_steps),
                       threshold=state.threshold + 5.0 * switch,
                       active=active & ~stop, ended=torch.where(stop, ended, state.ended)), counted & ~blamed
