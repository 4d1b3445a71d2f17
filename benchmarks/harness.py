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
from typing import Callable, Optional, Sequence

import pytest
import torch

from fastl2r import ops
from fastl2r.data import ImageDataset, make_task
from fastl2r.experiments import build_config
from fastl2r.meta import MetaLearner, MetaState
from fastl2r.meta.metalearner import CONV_HIDDEN, NORM_HIDDEN
from fastl2r.meta.trainer import MetaTrainer
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
class SyntheticTasks:
    """What ``MetaTrainer`` asks of an experiment, on random images of Experiment 1's shapes
    (3×32×32, Task A of 5 classes, Task B of 5 others): the work of a step does not depend on
    pixel values, and benchmarks need no dataset on disk."""

    def __init__(self, config: dict, device: str, *, seed: int = 0, images_per_class: int = 64):
        self.config, self.device = config, torch.device(device)
        gen = torch.Generator().manual_seed(seed)
        n = 10 * images_per_class
        images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = torch.arange(n) % 10
        self.dataset = ImageDataset("synthetic", images, labels, images, labels,
                                    tuple(str(c) for c in range(10)), (0.5,) * 3, (0.25,) * 3, flip=True)
        self.seed = seed

    def new_model(self, head_classes=()) -> torch.nn.Module:
        return ARCHITECTURES[self.config["arch"]](3, head_classes).to(self.device)

    def source_task(self):
        return make_task(self.dataset, range(5))

    def task(self, spec: dict, classes):
        return make_task(self.dataset, classes)

    def draw_classes(self, specs, rng):
        return [tuple(range(5, 10)) for _ in specs]

    def pretrained_state(self, index: int = 0) -> dict:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1000 + index)
            return {"model": self.new_model([5]).state_dict()}


class InnerStepRig:
    """``MetaTrainer.inner_step`` — Algorithm 1's inner step of every slot with its meta-update
    (the backward through the current T-BPTT window and an Adam step on θ) — at Experiment 1's
    settings and shapes (teacher batch 64 old + 64 new, student 64, 3×32×32), ``slots`` episodes
    side by side, on random data and a randomly initialised ``w0``; no episode ever ends."""

    def __init__(self, arch: str = "resnet32_gn", device: str = "cpu", *, slots: int = 1, seed: int = 0,
                 conv_hidden: int = CONV_HIDDEN, norm_hidden: int = NORM_HIDDEN, batch_size: int = 64):
        config = build_config("exp1", overrides=[f"arch={arch}", f"seed={seed}", f"metatrain.parallel_episodes={slots}",
                                                 "metatrain.threshold=[1e9, 0, 1e9]", "metatrain.episode_steps=1000000",
                                                 f"metatrain.batch_size={batch_size}"])
        tasks = SyntheticTasks(config, device, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            meta = MetaLearner(tasks.new_model(), lr=config["metatrain"]["lr"], conv_hidden=conv_hidden,
                               norm_hidden=norm_hidden)
        self.trainer = MetaTrainer(tasks, meta)
        self.trainer.start_episodes()

    def step(self) -> None:
        """One inner step of every slot, with its meta-update."""
        self.trainer.inner_step()

    def new_window(self, length: int = 1) -> None:
        """Truncate (as at the end of a T-BPTT window), then run ``length - 1`` inner steps, so
        that the next step back-propagates through ``length`` steps."""
        self.trainer.state = self.trainer.state.detach()
        for _ in range(length - 1):
            self.step()
