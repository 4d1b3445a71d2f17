"""Operator dispatches per meta-learner update and per inner step, reference vs fused (DESIGN §5).

A ``TorchDispatchMode`` sees every operator that reaches the dispatcher below autograd:
each aten op of a forward and of its backward, and each fastl2r custom op as one.  On a GPU
each one that is not a view is about one kernel launch (a fused op: its own few), so
launches are countable on any machine.  Counts do not depend on tensor sizes or the
device, only on the code path and the network's structure.

    python -m benchmarks.dispatch_counts [--device cpu|cuda] [--archs resnet8_gn,resnet32_gn] [--window 9]

prints the tables of BENCHMARKS.md: for the reference and every fused backend of the device,
and for 1, 4 and 16 episode slots side by side.
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastl2r import ops
from fastl2r.meta import find_meta_tensors
from fastl2r.models import ARCHITECTURES

from .harness import EAGER, InnerStepRig, fused_backends, update_inputs

ARCHS = ("resnet8_gn", "resnet14_gn", "resnet32_gn")


class DispatchCounter(TorchDispatchMode):
    """Counts the operators dispatched inside ``with DispatchCounter() as counter:``, by name,
    and notes which are views (``detach``, ``view``, ``select``...: metadata only, no kernel)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func.is_view:
            self.views.add(name)
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def non_view(self) -> int:
        """Dispatches that may run a kernel (on a GPU, about one launch each)."""
        return sum(n for name, n in self.ops.items() if name not in self.views)


@dataclass
class Counts:
    """Dispatches by operator name, of a forward and of its backward; ``views`` names the view ops."""

    forward: Counter
    backward: Counter
    views: set

    @property
    def n_forward(self) -> int:
        return sum(self.forward.values())

    @property
    def n_backward(self) -> int:
        return sum(self.backward.values())

    @property
    def total(self) -> int:
        return self.n_forward + self.n_backward

    @property
    def non_view(self) -> int:
        """Dispatches that may run a kernel (on a GPU, about one launch each)."""
        return sum(n for c in (self.forward, self.backward) for name, n in c.items() if name not in self.views)


def count_update(arch: str, backend: str, device: str = "cpu", **hidden: int) -> Counts:
    """Dispatches of one ``MetaLearner.step`` over every group (forward) and of the gradient
    w.r.t. θ of a loss on the new weights (backward)."""
    x = update_inputs(arch, device, **hidden)
    cotangents, theta = x.cotangents(), x.theta()
    with ops.use_backend(backend):
        with DispatchCounter() as forward:
            new_weights, _, _ = x.meta.step(x.weights, x.grads, x.means, x.state)
        with DispatchCounter() as backward:
            torch.autograd.grad(new_weights, theta, cotangents)
    return Counts(forward.ops, backward.ops, forward.views | backward.views)


COUNT_BATCH = 4  # counts do not depend on tensor sizes: a small batch keeps 16 slots quick


def count_inner_step(arch: str, backend: str, device: str = "cpu", window: int = 1, slots: int = 1,
                     **hidden: int) -> Counter:
    """Dispatches of one inner step of ``slots`` episodes side by side, with its meta-update
    (backward through ``window`` steps, Adam on θ)."""
    rig = InnerStepRig(arch, device, slots=slots, batch_size=COUNT_BATCH, **hidden)
    with ops.use_backend(backend):
        rig.step()  # fills the one-time caches (hashed element indices, slot index tables)
        rig.new_window(window)
        with DispatchCounter() as counter:
            rig.step()
    return counter


def host_reads(counter: DispatchCounter) -> int:
    """Device-to-host reads among the dispatches (``.item()``, ``.tolist()``, ``bool()`` of a tensor)."""
    return counter.ops["aten._local_scalar_dense"]


def table(archs, backends, device: str, window: int) -> str:
    """Markdown: per network and backend, dispatches of the update and of an inner step (in
    brackets: those that are not views)."""
    lines = ["| network | meta-nets | backend | update fwd | update bwd | update total (non-view) "
             f"| inner step, window 1 (non-view) | inner step, window {window} |",
             "|---|---|---|---|---|---|---|---|"]
    for arch in archs:
        nets = len(find_meta_tensors(ARCHITECTURES[arch]())[0])
        for backend in backends:
            update = count_update(arch, backend, device)
            first = count_inner_step(arch, backend, device, 1)
            last = count_inner_step(arch, backend, device, window)
            lines.append(f"| {arch} | {nets} | {backend} | {update.n_forward:,} | {update.n_backward:,} "
                         f"| {update.total:,} ({update.non_view:,}) | {first.total:,} ({first.non_view:,}) "
                         f"| {last.total:,} |")
    return "\n".join(lines)


def slots_table(archs, backend: str, device: str, slots=(1, 4, 16)) -> str:
    """Markdown: dispatches of one inner step (window 1) for S episodes side by side, and per
    episode-step; host reads inside the step."""
    lines = ["| network | backend | slots | inner step (non-view) | per episode-step | host reads |",
             "|---|---|---|---|---|---|"]
    for arch in archs:
        for s in slots:
            counter = count_inner_step(arch, backend, device, 1, s)
            lines.append(f"| {arch} | {backend} | {s} | {counter.total:,} ({counter.non_view:,}) "
                         f"| {counter.total / s:,.0f} | {host_reads(counter)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated, from: " + ", ".join(ARCHITECTURES))
    parser.add_argument("--window", type=int, default=9, help="T-BPTT window of the last column (default 9)")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        parser.error(f"unknown architecture {unknown[0]!r}")
    if args.window < 1:
        parser.error("--window must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU on this machine")
    print(table(archs, [EAGER, *fused_backends(args.device)], args.device, args.window))
    print()
    print(slots_table(archs, fused_backends(args.device)[0], args.device))


if __name__ == "__main__":
    main()
