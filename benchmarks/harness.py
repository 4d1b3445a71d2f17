"""What the benchmarks share: the variants they time (and why one cannot run here), the timer,
the inputs of one meta-learner update, and Algorithm 1's inner step on random data.

A *variant* is a backend forced with ``fastl2r.ops.use_backend``, or ``compiled-reference``:
``torch.compile`` of the very callable timed for the eager reference.  Every ratio is taken
against the eager reference and the compiled reference of the same benchmark, timed on the
same inputs in the same process.
"""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import pytest
import torch

from fastl2r import ops
from fastl2r.data import Batch
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner, MetaState
from fastl2r.meta.metalearner import CONV_HIDDEN, NORM_HIDDEN
from fastl2r.meta.student import FunctionalStudent
from fastl2r.meta.training import EpisodeState, MetaTrainer, inner_step
from fastl2r.models import ARCHITECTURES

EAGER = "reference"
COMPILED = "compiled-reference"
FUSED = ("cpp", "cuda", "triton")
VARIANTS = (EAGER, COMPILED, *FUSED)
DEVICES = ("cpu", "cuda")
# Untimed calls before the timed rounds (they compile, autotune and fill the caching allocator).
WARMUP = {"cpu": 1, "cuda": 5}
# Episode slots per op call (DESIGN §6) that the op benchmarks run.
SLOTS = (1, 4, 16)


def backend_of(variant: str) -> str:
    return "reference" if variant == COMPILED else variant


def skip_reason(variant: str, device: str) -> Optional[str]:
    """Why ``variant`` cannot be benchmarked on ``device`` here, or None."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if variant == "triton" and (device == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"):
        return "Triton on this device runs only in its interpreter, a correctness tool, not a benchmark"
    backend = ops.BACKENDS[backend_of(variant)]
    if device not in backend.devices:
        return f"the {variant} backend runs on {', '.join(backend.devices)} tensors, not {device}"
    return backend.unavailable(device)


def require(variant: str, device: str, *, unrolls_every_meta_net: bool = False) -> None:
    """Skip unless ``variant`` runs on ``device``.  A benchmark whose reference loops over every
    meta-net of resnet32_gn compiles one unrolled graph of them all: too slow to build on a CPU
    (over 10 minutes on 2 busy cores) unless ``FASTL2R_BENCH_COMPILE_CPU=1``."""
    reason = skip_reason(variant, device)
    if (reason is None and unrolls_every_meta_net and variant == COMPILED and device == "cpu"
            and os.environ.get("FASTL2R_BENCH_COMPILE_CPU") != "1"):
        reason = ("torch.compile of the reference unrolls all 93 meta-nets of resnet32_gn: building it took over "
                  "10 minutes on 2 busy CPU cores; set FASTL2R_BENCH_COMPILE_CPU=1 to include it")
    if reason is not None:
        pytest.skip(reason)


def fused_backends(device: str) -> list[str]:
    """The fused backends that run on ``device`` here."""
    return [b for b in FUSED if skip_reason(b, device) is None]


def variant_params(variants: Sequence[str] = VARIANTS) -> list:
    """``(device, variant)`` parameters for every device a variant's backend is made for; the
    CUDA ones carry the ``cuda`` mark."""
    return [pytest.param(device, variant, id=f"{device}-{variant}",
                         marks=[pytest.mark.cuda] if device == "cuda" else [])
            for device in DEVICES for variant in variants if device in ops.BACKENDS[backend_of(variant)].devices]


def device_label(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


def measure(benchmark, fn: Callable, *, op: str, variant: str, device: str, rounds: dict,
            warmup: dict = WARMUP, setup: Optional[Callable] = None, bytes_moved: Optional[int] = None,
            slots: int = 1) -> None:
    """Time ``fn`` (``rounds[device]`` rounds after ``warmup[device]`` untimed ones) and record
    what ``ratio_table`` reads in ``benchmark.extra_info`` (``slots``: episode slots per op call).

    CPU: pytest-benchmark's own timer.  CUDA: the call is synchronised for pytest-benchmark,
    and also timed with CUDA events; their median is ``median_s``, the figure the table uses.
    ``setup`` runs untimed before every round.
    """
    warmup = warmup[device]
    samples: list[float] = []
    if device == "cuda":
        def target():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        if setup is not None:
            setup = _synchronised(setup)
    else:
        target = fn
    benchmark.group = f"{op} on {device}" + (f", {slots} slots" if slots > 1 else "")
    benchmark.extra_info.update(op=op, variant=variant, device=device_label(device), bytes=bytes_moved, slots=slots)
    benchmark.pedantic(target, setup=setup, rounds=rounds[device], warmup_rounds=warmup, iterations=1)
    if len(samples) > warmup:  # (not with --benchmark-disable, which runs fn once)
        benchmark.extra_info.update(median_s=statistics.median(samples[warmup:]), timer="cuda-events")
    else:
        benchmark.extra_info.update(timer="pytest-benchmark")


def _synchronised(fn: Callable) -> Callable:
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def forced(variant: str, fn: Callable) -> Callable:
    """``fn`` run with ``variant``'s backend forced (compiled first for the compiled reference)."""
    call = torch.compile(fn) if variant == COMPILED else fn

    def run(*args):
        with ops.use_backend(backend_of(variant)):
            return call(*args)
    return run


def slotted(x: torch.Tensor, rows: Sequence[int], slots: int, dim: int = 0) -> torch.Tensor:
    """One slot's rows of a group (``rows[t]`` per tensor along ``dim``) laid out for ``slots``
    episode slots as the fused ops take them: each tensor's rows once per slot, slot by slot.
    Every slot gets the same values, which is all a timing needs."""
    return torch.cat([block for block in x.split(list(rows), dim) for _ in range(slots)], dim)


# ----- one meta-learner update -----
@dataclass
class UpdateInputs:
    """The inputs of one ``MetaLearner.step`` for a student of ``arch``: its grouped weights,
    a gradient, the activation means and live LSTM states (random, at realistic scales)."""

    meta: MetaLearner
    weights: list[torch.Tensor]
    grads: list[torch.Tensor]
    means: torch.Tensor
    state: MetaState

    def theta(self) -> list[torch.Tensor]:
        return list(self.meta.parameters())

    def cotangents(self, seed: int = 1) -> list[torch.Tensor]:
        """Fixed gradients of a loss on the new weights (the same for every variant)."""
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(w.shape, generator=gen).to(w) for w in self.weights]


def update_inputs(arch: str = "resnet32_gn", device: str = "cpu", *, conv_hidden: int = CONV_HIDDEN,
                  norm_hidden: int = NORM_HIDDEN, seed: int = 0) -> UpdateInputs:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[arch](3, [5])
        meta = MetaLearner(model, conv_hidden=conv_hidden, norm_hidden=norm_hidden).to(device)

    def randn(shape, scale):
        return (torch.randn(shape, generator=gen) * scale).to(device)

    weights = [w.to(device) for w in meta.flatten({n: p.detach() for n, p in model.named_parameters()})]
    grads = [randn(w.shape, 0.01) for w in weights]
    state = meta.initial_state(device)
    state = MetaState([randn(h.shape, 0.5) for h in state.h], [randn(c.shape, 0.5) for c in state.c])
    return UpdateInputs(meta, weights, grads, randn((meta.channel_count,), 1.0), state)


def update_forward_backward(x: UpdateInputs, cotangents: Sequence[torch.Tensor],
                            step: Optional[Callable] = None) -> tuple[torch.Tensor, ...]:
    """``MetaLearner.step`` over every group, then the gradient w.r.t. θ of a loss on the new
    weights (given by its ``cotangents``): the whole meta-learner update, forward + backward."""
    new_weights, _, _ = (step or x.meta.step)(x.weights, x.grads, x.means, x.state)
    return torch.autograd.grad(new_weights, x.theta(), list(cotangents))


# ----- Algorithm 1's inner step -----
class InnerStepRig:
    """``fastl2r.meta.training.inner_step`` and the trainer's meta-update (an Adam step on θ)
    at Experiment 1's settings and shapes — 3×32×32 images, a teacher batch of 64 old-task and
    64 new-task examples, the student's 64 — on random data and a randomly initialised ``w0``."""

    def __init__(self, arch: str = "resnet32_gn", device: str = "cpu", *, seed: int = 0, batches: int = 4,
                 conv_hidden: int = CONV_HIDDEN, norm_hidden: int = NORM_HIDDEN):
        config = build_config("exp1", overrides=[f"arch={arch}", f"seed={seed}"])
        self.mt = config["metatrain"]
        self.device = torch.device(device)
        classes = len(config["tasks"]["source"]["classes"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = ARCHITECTURES[arch](3, [classes]).to(device)
            meta = MetaLearner(teacher, lr=self.mt["lr"], conv_hidden=conv_hidden, norm_hidden=norm_hidden)
            # The trainer itself, over a stand-in for the experiment (it needs only these three).
            experiment = SimpleNamespace(config=config, device=self.device,
                                         new_model=lambda: ARCHITECTURES[arch](3).to(device))
            self.trainer = MetaTrainer(experiment, meta)
        student = FunctionalStudent(self.trainer.skeleton, self.trainer.meta)
        student.load(teacher)
        head = teacher.add_head(classes)
        student.add_head(teacher.heads[head].weight, teacher.heads[head].bias)
        self.episode = EpisodeState(teacher, student, self.trainer.meta.initial_state(self.device), head)
        gen = torch.Generator().manual_seed(seed)
        n = self.mt["batch_size"]

        def batch() -> Batch:
            return Batch(torch.randn(n, 3, 32, 32, generator=gen).to(device),
                         torch.randint(0, classes, (n,), generator=gen).to(device),
                         torch.zeros(n, dtype=torch.long, device=device))
        self.batches = [(batch(), batch()) for _ in range(batches)]
        self.steps = 0

    def step(self) -> torch.Tensor:
        """One inner step; returns the meta-loss, in the graph of the current T-BPTT window."""
        batch_a, batch_b = self.batches[self.steps % len(self.batches)]
        self.steps += 1
        return inner_step(self.episode, batch_a, batch_b, lr=self.mt["lr"], loss_scale=self.mt["loss_scale"],
                          theta=self.trainer.meta.snapshot())

    def meta_update(self, loss: torch.Tensor) -> None:
        """The trainer's Adam step on θ, back-propagating through the whole current window."""
        if self.trainer.meta_update(loss) is None:
            raise FloatingPointError("the meta-loss or its gradient is not finite")

    def new_window(self, length: int = 1) -> None:
        """Truncate (as at the end of a T-BPTT window), then run ``length - 1`` inner steps
        without meta-update, so that the next step back-propagates through ``length`` steps."""
        self.episode.student.truncate()
        self.episode.state = self.episode.state.detach()
        for _ in range(length - 1):
            self.step()
