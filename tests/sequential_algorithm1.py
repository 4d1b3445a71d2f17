"""Algorithm 1 written the plain way, one episode at a time: the oracle of the vectorised trainer.

Everything here is deliberately naive and independent of ``fastl2r.meta.unroll``: the teacher
is an ``nn.Module`` trained by SGD through its heads, the student a ``functional_call`` of the
skeleton whose activation means come from forward hooks, θ a module stepped by
``torch.optim.Adam`` (through snapshots of θ that stay in the graph), and every decision —
threshold, horizon, T-BPTT truncation, Experiment 5's task switch — is taken on the host after
reading the loss, exactly as DESIGN §1.4 says.  Only the data stream (the keyed sampler, so
that both see the same batches) and the episodes' draws are shared with the library.
"""
from __future__ import annotations

import copy
import math
import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from fastl2r.data.sampler import SamplingSet
from fastl2r.experiments import curriculum_at
from fastl2r.meta import MetaLearner
from fastl2r.meta.metalearner import ActivationTaps, is_head


class FunctionalStudent:
    """The student: grouped meta-learned weights (in the graph within a window) and plain tensors."""

    def __init__(self, skeleton: nn.Module, meta: MetaLearner, model: nn.Module):
        self.skeleton, self.meta = skeleton, meta
        self.taps = ActivationTaps(skeleton, meta.head_prefix)
        tensors = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.flats = meta.flatten(tensors)
        self.plain = {n: tensors[n] for n in meta.plain_names(tensors)}

    def represent(self, x, flats=None, plain=None):
        plain = self.plain if plain is None else plain
        body = {n: t for n, t in plain.items() if not is_head(n, self.meta.head_prefix)}
        return functional_call(self.skeleton, {**self.meta.unflatten(self.flats if flats is None else flats),
                                               **body}, (x,))

    def learn(self, x, y, task, state, lr, theta):
        leaves = [f.detach().requires_grad_() for f in self.flats]
        plain = {n: t.detach().requires_grad_() for n, t in self.plain.items()}
        with torch.enable_grad():
            h = self.represent(x, leaves, plain)
            prefix = f"{self.meta.head_prefix}.{task}"
            loss = F.cross_entropy(F.linear(h, plain[prefix + ".weight"], plain[prefix + ".bias"]), y)
            grads = torch.autograd.grad(loss, leaves + list(plain.values()), allow_unused=True)
        means = self.taps.means()
        flat_grads = [g if g is not None else torch.zeros_like(f) for g, f in zip(grads, leaves)]
        self.flats, state, _ = self.meta.step(self.flats, flat_grads, means, state, theta)
        for (name, value), g in zip(list(self.plain.items()), grads[len(leaves):]):
            if g is not None:
                self.plain[name] = value.detach() - lr * g
        return state


def multitask_loss(model: nn.Module, x, y, task):
    """Mean cross-entropy of every example under its own task's head (a host-side loop over tasks)."""
    h = model(x)
    total = h.new_zeros(())
    for t in task.unique().tolist():
        mask = task == t
        total = total + F.cross_entropy(model.heads[t](h[mask]), y[mask], reduction="sum")
    return total / x.shape[0]


def sequential_metatraining(trainer, episodes: int) -> list[dict]:
    """Run ``episodes`` episodes of Algorithm 1 on ``trainer``'s θ, configuration, sampler and
    checkpoints, one at a time; θ is updated in place.  Returns one record per episode."""
    exp, mt, meta, sampler = trainer.workspace, trainer.mt, trainer.meta, trainer.sampler
    dtype = next(meta.parameters()).dtype
    optimizer = torch.optim.Adam(meta.parameters(), lr=mt["meta_lr"])
    specs = trainer.specs
    records = []
    for episode in range(episodes):
        threshold, tbptt = curriculum_at(trainer.config, episode)
        seed = trainer.episode_seed(episode)
        rng = random.Random(seed)
        checkpoint = rng.randrange(mt["checkpoints"])
        tasks = [exp.task(spec, c) for spec, c in zip(specs, exp.draw_classes(specs, rng))]
        teacher = exp.pretrained_model(checkpoint).to(dtype)
        generator = torch.Generator().manual_seed(seed)
        for task in tasks:  # the fresh heads, from the episode's seed
            head = nn.Linear(teacher.heads[0].in_features, task.num_classes).to(dtype)
            bound = 1.0 / math.sqrt(head.in_features)
            with torch.no_grad():
                head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
                head.bias.copy_(torch.rand(head.bias.shape, generator=generator) * 2 * bound - bound)
            teacher.heads.append(head)
        student = FunctionalStudent(copy.deepcopy(trainer.skeleton).to(dtype), meta, teacher)
        state = meta.initial_state(trainer.device, dtype)
        key = torch.tensor([seed])
        losses, ended_by, window, step = [], "horizon", 0, 0
        for phase, task in enumerate(tasks):
            old_set = sampler.sampling_set([trainer.source] + tasks[:phase])
            new_set = sampler.sampling_set([task], first_task=1 + phase)
            limit = threshold + 5.0 * phase
            ended_by = "horizon"
            for _ in range(mt["episode_steps"]):
                counter = torch.tensor([step])
                old = sampler.sample(SamplingSet(*(t[None] for t in vars(old_set).values())), key, counter, 0)
                new = sampler.sample(SamplingSet(*(t[None] for t in vars(new_set).values())), key, counter, 1)
                x_both = torch.cat([old.x[0], new.x[0]]).to(dtype)
                y_both, task_both = torch.cat([old.y[0], new.y[0]]), torch.cat([old.task[0], new.task[0]])
                loss = multitask_loss(teacher, x_both, y_both, task_both)
                params = list(teacher.parameters())
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        if g is not None:
                            p.sub_(mt["lr"] * g)
                theta = meta.snapshot()
                state = student.learn(new.x[0].to(dtype), new.y[0], 1 + phase, state, mt["lr"], theta)
                with torch.no_grad():
                    target = teacher(x_both)
                meta_loss = mt["loss_scale"] * F.huber_loss(student.represent(x_both), target, delta=1.0)
                step += 1
                optimizer.zero_grad()
                meta_loss.backward(retain_graph=True)
                value = meta_loss.item()
                grads_finite = all(torch.isfinite(p.grad).all() for p in meta.parameters() if p.grad is not None)
                if not (math.isfinite(value) and grads_finite):
                    ended_by = "nonfinite"
                    break
                optimizer.step()
                losses.append(value)
                window += 1
                if window >= tbptt:  # also when the threshold ends the phase: Experiment 5 goes on
                    student.flats = [f.detach() for f in student.flats]
                    state = state.detach()
                    window = 0
                if value > limit:
                    ended_by = "threshold"
                    break
            if ended_by == "nonfinite":
                break
        student.taps.remove()
        records.append({"episode": episode, "steps": step, "losses": losses, "ended_by": ended_by,
                        "checkpoint": checkpoint, "tasks_reached": phase + 1})
    return records
