"""Algorithm 1: meta-training the meta-learner by imitating a multi-task teacher (DESIGN §1.4).

``inner_step`` is one step of the inner loop (teacher SGD step, student meta-learned
step, meta-loss); ``MetaTrainer`` runs episodes with T-BPTT, an Adam step on θ every
inner step, loss-threshold restarts, the curriculum, Experiment 3's checkpoint pool,
Experiment 5's task switch, checkpoints and exact resumption.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import _io
from ..data import Batch, TaskSampler
from ..errors import UserError
from ..experiments import curriculum_at
from ..profiling import nvtx_range
from ..training import join, multitask_loss
from .metalearner import MetaLearner, MetaState, Theta
from .student import FunctionalStudent

if TYPE_CHECKING:
    from ..runner import Experiment

CHECKPOINT = "metatrain_checkpoint.pt"
METALEARNER = "metalearner.pt"


@dataclass
class EpisodeState:
    """What one inner step reads and advances."""

    teacher: nn.Module
    student: FunctionalStudent
    state: MetaState
    task_index: int  # the head of the current new task (1 for Task B, 2 for Task 3)


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    """Plain SGD (no momentum) of every parameter that received a gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    stepped = [(p, g) for p, g in zip(params, grads) if g is not None]
    with torch.no_grad():  # one fused multi-tensor op, however deep the network
        torch._foreach_add_([p for p, _ in stepped], [g for _, g in stepped], alpha=-lr)


def inner_step(ep: EpisodeState, batch_a: Batch, batch_b: Batch, *, lr: float, loss_scale: float,
               theta: Optional[Theta] = None) -> torch.Tensor:
    """One step of Algorithm 1's inner loop; returns the meta-loss ``λ·Huber(h, ĥ)`` (in the graph).

    ``batch_a`` holds earlier tasks (task indices = their heads), ``batch_b`` the new task.
    """
    both = join(batch_a, batch_b, task_offset_b=ep.task_index)
    with nvtx_range("teacher_step"), torch.enable_grad():
        teacher_loss = multitask_loss(ep.teacher.heads, ep.teacher(both.x), both.y, both.task)
        sgd_step(ep.teacher, teacher_loss, lr)
    # student.learn opens the student_grad and meta_update ranges
    ep.state, _, _ = ep.student.learn(batch_b.x, batch_b.y, ep.task_index, ep.state, lr, theta)
    with nvtx_range("meta_loss"):
        with torch.no_grad():
            h = ep.teacher(both.x)
        h_student = ep.student.represent(both.x)
        return loss_scale * F.huber_loss(h_student, h, delta=1.0)


@dataclass
class EpisodeRecord:
    episode: int
    steps: int            # inner steps run
    final_loss: float
    mean_loss: float
    threshold: float
    tbptt: int
    ended_by: str         # "threshold" | "horizon" | "nonfinite"
    checkpoint: int       # which pre-trained w0 (Experiment 3)
    tasks_reached: int    # new tasks started (Experiment 5 switches to its second one)


@dataclass
class TrainerProgress:
    episode: int = 0
    inner_steps: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)


class MetaTrainer:
    """Runs Algorithm 1 for ``config["metatrain"]`` episodes on an ``Experiment``'s tasks."""

    def __init__(self, experiment: "Experiment", meta: Optional[MetaLearner] = None,
                 run_dir: Optional[Path] = None):
        self.experiment = experiment
        self.config = experiment.config
        self.mt = self.config["metatrain"]
        self.device = experiment.device
        skeleton = experiment.new_model()
        if meta is None:
            with torch.random.fork_rng(devices=[]):  # θ's initialisation follows the run's seed
                torch.manual_seed(self.config["seed"])
                meta = MetaLearner(skeleton, lr=self.mt["lr"])
        self.meta = meta.to(self.device)
        self.skeleton = skeleton
        self.optimizer = torch.optim.Adam(self.meta.parameters(), lr=self.mt["meta_lr"])
        self.progress = TrainerProgress()
        self.run_dir = run_dir
        self._start = time.perf_counter()

    # ----- checkpoints -----
    def state_dict(self) -> dict:
        return {"meta": self.meta.state_dict(), "optimizer": self.optimizer.state_dict(),
                "progress": asdict(self.progress), "config": self.config,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def load_state_dict(self, state: dict) -> None:
        self.meta.load_state_dict(state["meta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = TrainerProgress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self) -> None:
        if self.run_dir is not None:
            _io.torch_save(self.state_dict(), self.run_dir / CHECKPOINT)

    def resume(self, run_dir: Path) -> bool:
        """Continue from ``run_dir``'s checkpoint if there is one; returns whether there was."""
        path = Path(run_dir) / CHECKPOINT
        if not path.exists():
            return False
        try:
            state = torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # a corrupt or foreign file
            raise UserError(f"cannot resume from {path}: {exc}") from None
        self.load_state_dict(state)
        return True

    # ----- one episode -----
    def episode_seed(self, episode: int) -> int:
        return (self.config["seed"] * 1_000_003 + episode) % (2 ** 31)

    def run_episode(self, episode: int, bar: Optional[tqdm] = None) -> EpisodeRecord:
        exp, mt = self.experiment, self.mt
        threshold, tbptt = curriculum_at(self.config, episode)
        seed = self.episode_seed(episode)
        rng = random.Random(seed)
        checkpoint = rng.randrange(mt["checkpoints"])
        specs = self.config["tasks"]["meta_train"]
        new_tasks = [exp.task(spec, cls) for spec, cls in zip(specs, exp.draw_classes(specs, rng))]
        tasks = [exp.source_task()]
        teacher = exp.pretrained_model(checkpoint)
        student = FunctionalStudent(self.skeleton, self.meta)
        student.load(teacher)
        ep = EpisodeState(teacher, student, self.meta.initial_state(self.device), 0)
        generator = torch.Generator().manual_seed(seed)
        losses, ended_by, window, step_in_episode = [], "horizon", 0, 0
        for phase, task in enumerate(new_tasks):
            index = teacher.add_head(task.num_classes)
            head = teacher.heads[index]
            with torch.no_grad():  # the fresh head, shared by teacher and student, from the episode's seed
                bound = 1.0 / math.sqrt(head.in_features)
                head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
                head.bias.copy_(torch.rand(head.bias.shape, generator=generator) * 2 * bound - bound)
            student.add_head(head.weight, head.bias)
            ep.task_index = index
            sampler_a = TaskSampler(tasks, mt["batch_size"], device=self.device, seed=seed + 2 * phase + 1)
            sampler_b = TaskSampler([task], mt["batch_size"], device=self.device, seed=seed + 2 * phase + 2)
            tasks.append(task)
            limit = threshold + 5.0 * phase
            ended_by = "horizon"
            for _ in range(mt["episode_steps"]):
                loss = inner_step(ep, sampler_a.sample(), sampler_b.sample(), lr=mt["lr"],
                                  loss_scale=mt["loss_scale"], theta=self.meta.snapshot())
                step_in_episode += 1
                self.progress.inner_steps += 1
                value = self.meta_update(loss)
                if value is None:
                    ended_by = "nonfinite"
                    self.progress.nonfinite += 1
                    break
                losses.append(value)
                window += 1
                if bar is not None:
                    elapsed = self.progress.seconds + (time.perf_counter() - self._start)
                    bar.set_postfix(ep=episode, step=step_in_episode, loss=f"{value:.2f}", thr=limit,
                                    tbptt=tbptt, its=f"{self.progress.inner_steps / max(elapsed, 1e-9):.2f}/s")
                if value > limit:
                    ended_by = "threshold"
                    break
                if window >= tbptt:
                    ep.student.truncate()
                    ep.state = ep.state.detach()
                    window = 0
            if ended_by == "nonfinite":
                break
        return EpisodeRecord(episode, step_in_episode, losses[-1] if losses else float("nan"),
                             sum(losses) / len(losses) if losses else float("nan"), threshold, tbptt, ended_by,
                             checkpoint, len(tasks) - 1)

    def meta_update(self, loss: torch.Tensor) -> Optional[float]:
        """An Adam step on θ from ``loss``'s gradient through the current T-BPTT window; returns
        the loss's value. A non-finite loss or gradient leaves θ untouched and returns None.
        The loss and the gradients' finiteness come to the host in one read, after the backward."""
        with nvtx_range("meta_backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(retain_graph=True)
            grads = [p.grad for p in self.meta.parameters() if p.grad is not None]
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            value, grads_finite = torch.stack([loss.detach(), finite.to(loss.dtype)]).tolist()
            if not (math.isfinite(value) and grads_finite):
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self.optimizer.step()
        return value

    # ----- the whole run -----
    def train(self, progress: bool = True, stop_after: Optional[int] = None) -> MetaLearner:
        """Run the remaining episodes (up to episode ``stop_after`` if given), checkpointing every
        ``save_every`` episodes and at the end; the finished meta-learner goes to ``metalearner.pt``."""
        total = self.mt["episodes"]
        until = total if stop_after is None else min(stop_after, total)
        for index in range(self.mt["checkpoints"]):  # pre-training w0 is not meta-training time
            self.experiment.pretrained_state(index)
        self._start = time.perf_counter()
        bar = tqdm(total=total, initial=self.progress.episode, desc="meta-training", disable=not progress,
                   dynamic_ncols=True)
        while self.progress.episode < until:
            record = self.run_episode(self.progress.episode, bar)
            self.progress.history.append(asdict(record))
            self.progress.episode += 1
            bar.update(1)
            if self.progress.episode % self.mt["save_every"] == 0:
                self._checkpoint()
        bar.close()
        self._checkpoint()
        if self.run_dir is not None and self.progress.episode == total:
            _io.torch_save({"meta": self.meta.state_dict(), "arch": self.config["arch"],
                            "config": self.config}, self.run_dir / METALEARNER)
            _io.write_json(self.run_dir / "metatrain.json", {k: v for k, v in asdict(self.progress).items()})
        return self.meta

    def _checkpoint(self) -> None:
        self.progress.seconds += time.perf_counter() - self._start
        self._start = time.perf_counter()
        self.save()

    @property
    def steps_per_second(self) -> float:
        return self.progress.inner_steps / max(self.progress.seconds, 1e-9)
