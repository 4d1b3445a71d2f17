"""Algorithm 1: meta-training the meta-learner by imitating a multi-task teacher (DESIGN §1.4, §6).

``MetaTrainer`` runs ``metatrain.episodes`` episodes on ``metatrain.parallel_episodes`` slots
side by side, one T-BPTT window at a time.  Inside a window every step is the pure
``Unroll.step`` plus an Adam step on θ (the mean of the counted slots' meta-gradients), all
on the device: no host read.  At each window boundary the host reads the window's losses and
the slots' end reasons once, records finished episodes, starts new ones on idle slots
(masked writes: classes, ``w0`` checkpoint, fresh heads, zeroed LSTM states) and saves a
checkpoint when one is due.  One slot is exactly Algorithm 1.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from .. import _io
from ..data.sampler import SamplingSet, SlotSampler
from ..errors import UserError, first_line
from ..experiments import computation_changes, curriculum_at
from ..models import runs_slots, tapped_layers
from ..profiling import nvtx_range
from ..workspace import Workspace
from .metalearner import MetaLearner, MetaState
from .optimizer import save_metalearner
from .unroll import END_REASONS, RUNNING, SlotState, Unroll

CHECKPOINT = "metatrain_checkpoint.pt"
METALEARNER = "metalearner.pt"
# The share of non-finite episodes is judged once this many episodes have finished (all of them,
# in shorter runs), so that one unlucky episode among the first few does not stop a run.
NONFINITE_JUDGED_AFTER = 10
# Slots per device when ``metatrain.parallel_episodes`` is 0 (auto).  On the CPU, measured: a
# folded network of S slots costs more than S networks (grouped convolutions are slower than
# plain ones in oneDNN), so one slot is fastest.  On CUDA: provisional, until measured.
AUTO_SLOTS = {"cpu": 1, "cuda": 16}


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
    episode: int = 0          # episodes finished
    started: int = 0          # episodes started
    inner_steps: int = 0      # steps of running episodes (slot-steps)
    windows: int = 0
    nonfinite: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)


@dataclass
class RunningEpisode:
    """What the host keeps of the episode a slot runs."""

    episode: int
    checkpoint: int
    threshold: float
    tbptt: int
    steps: int = 0        # inner steps of it the host has counted
    losses: list = field(default_factory=list)


class MaskedAdam:
    """Adam (``torch.optim.Adam``'s arithmetic) whose step is applied only where a device flag
    says so: a skipped step changes nothing, and deciding needs no host read."""

    def __init__(self, params: list[torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps = params, lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.count = torch.zeros((), dtype=params[0].dtype, device=params[0].device)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], apply: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        count = self.count + apply.to(self.count.dtype)
        step_size = self.lr / (1 - beta1 ** count)
        bias2_sqrt = (1 - beta2 ** count).sqrt()
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            m_new = m.lerp(g, 1 - beta1)
            v_new = (v * beta2).addcmul_(g, g, value=1 - beta2)
            p_new = p - step_size * m_new / (v_new.sqrt() / bias2_sqrt + self.eps)
            for old, new in ((m, m_new), (v, v_new), (p, p_new)):
                old.copy_(torch.where(apply, new, old))
        self.count = count

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        for mine, saved in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
            for t, s in zip(mine, saved):
                t.copy_(s)
        self.count = state["count"].to(self.count)


class MetaTrainer:
    """Runs Algorithm 1 for ``config["metatrain"]`` episodes on a workspace's tasks (any object with
    ``Workspace``'s ``config``, ``device``, ``new_model``, ``source_task``, ``task``, ``draw_classes``
    and ``pretrained_state`` will do)."""

    def __init__(self, workspace: Workspace, meta: Optional[MetaLearner] = None,
                 run_dir: Optional[Path] = None):
        self.workspace = workspace
        self.config = workspace.config
        self.mt = self.config["metatrain"]
        self.device = workspace.device
        self.skeleton = workspace.new_model()
        if meta is None:
            with torch.random.fork_rng(devices=[]):  # θ's initialisation follows the run's seed
                torch.manual_seed(self.config["seed"])
                meta = MetaLearner(self.skeleton, lr=self.mt["lr"])
        self.meta = meta.to(self.device)
        self.slots = self.mt["parallel_episodes"] or AUTO_SLOTS.get(self.device.type, 1)
        if self.slots > 1 and not runs_slots(self.skeleton, self.meta.head_prefix):
            raise UserError(f"metatrain.parallel_episodes={self.slots}, but the {self.config['arch']} network does "
                            "not fold episode slots (its layers are not Slot layers); set it to 1")
        self.optimizer = MaskedAdam(list(self.meta.parameters()), self.mt["meta_lr"])
        # On the CPU the device is the host: reading whether any slot still runs waits for nothing,
        # so a window ends as soon as every slot has stopped (no idle steps).  On an accelerator
        # nothing is read inside a window: stopped slots idle until it ends.
        self.end_windows_early = self.device.type == "cpu"
        self.progress = TrainerProgress()
        self.run_dir = run_dir
        self.specs = self.config["tasks"]["meta_train"]
        self.source = workspace.source_task()
        self.sampler = SlotSampler(
            [self.source] + [workspace.task(spec, spec["classes"] if "classes" in spec else spec["pool"])
                             for spec in self.specs],
            self.mt["batch_size"], device=self.device)
        self.unroll = Unroll(self.skeleton, self.meta, self.sampler, tapped_layers(self.skeleton, self.meta.head_prefix),
                             slots=self.slots, lr=self.mt["lr"], loss_scale=self.mt["loss_scale"],
                             horizon=self.mt["episode_steps"], phases=len(self.specs),
                             objective=self.mt["objective"])
        self._classes = [len(self.source.classes)] + [len(spec.get("classes", ())) or spec["ways"]
                                                      for spec in self.specs]
        self._set_width = sum(self._classes)
        with torch.no_grad():  # the representation's width, from one image
            self._dim = self.skeleton(self.sampler.images[:1].float()).shape[1]
        self._pool: Optional[dict] = None
        self.state = self._idle_state()
        self.running: dict[int, RunningEpisode] = {}
        self._start = time.perf_counter()
        self._saved_at = time.perf_counter()
        self._saved_windows = 0  # progress.windows at the last checkpoint

    # ----- episodes -----
    def episode_seed(self, episode: int) -> int:
        return (self.config["seed"] * 1_000_003 + episode) % (2 ** 31)

    def _checkpoint_pool(self) -> dict:
        """Every pre-trained ``w0`` (Experiment 3's pool) on the device, grouped like the slots."""
        if self._pool is None:
            states = [self.workspace.pretrained_state(i)["model"] for i in range(self.mt["checkpoints"])]
            prefix = self.meta.head_prefix + ".0."
            self._pool = {
                "flats": [torch.stack(group) for group in zip(*(self.meta.flatten(s) for s in states))],
                "plain": {n: torch.stack([s[n] for s in states])
                          for n in self.meta.plain_names(states[0]) if not n.startswith(self.meta.head_prefix)},
                "head": torch.stack([torch.cat([s[prefix + "weight"], s[prefix + "bias"][:, None]], 1)
                                     for s in states]),
            }
            dtype = next(self.meta.parameters()).dtype
            self._pool = {k: _to(v, self.device, dtype) for k, v in self._pool.items()}
        return self._pool

    def _idle_state(self) -> SlotState:
        """Every slot idle, with zeros of the right shapes."""
        S, dev = self.slots, self.device
        dtype = next(self.meta.parameters()).dtype
        weights = [torch.zeros(S * sum(g.rows), g.dims.K, device=dev, dtype=dtype) for g in self.meta.groups]
        plain = {n: torch.zeros(S * p.shape[0], *p.shape[1:], device=dev, dtype=dtype)
                 for n, p in self.skeleton.named_parameters() if n in self.meta.plain_parameters
                 and not n.startswith(self.meta.head_prefix)}
        heads = [torch.zeros(S, c, self._dim + 1, device=dev, dtype=dtype) for c in self._classes]
        sets = SamplingSet(*(torch.zeros(S, len(self.specs), self._set_width, dtype=torch.int64, device=dev)
                             for _ in range(3)))
        zeros = torch.zeros(S, dtype=torch.int64, device=dev)
        return SlotState(teacher=weights, teacher_plain=plain, teacher_heads=heads,
                         student=[w.clone() for w in weights], student_plain=dict(plain),
                         student_heads=[h.clone() for h in heads],
                         lstm=self.meta.initial_state(dev, dtype, slots=S), old_sets=sets, new_sets=sets,
                         key=zeros, active=zeros.bool(), phase=zeros, steps=zeros, phase_steps=zeros,
                         threshold=torch.zeros(S, dtype=dtype, device=dev), ended=zeros)

    def start_episodes(self) -> None:
        """Start the next episodes on the idle slots, in slot order (masked writes)."""
        idle = [s for s in range(self.slots) if s not in self.running]
        starts = []
        for slot in idle:
            if self.progress.started >= self.mt["episodes"]:
                break
            starts.append((slot, self.progress.started))
            self.progress.started += 1
        if not starts:
            return
        pool, S, dev = self._checkpoint_pool(), self.slots, self.device
        slots = torch.tensor([s for s, _ in starts], device=dev)
        checkpoints, thresholds, keys, heads, old_sets, new_sets = [], [], [], [], [], []
        for slot, episode in starts:
            seed = self.episode_seed(episode)
            rng = random.Random(seed)
            checkpoint = rng.randrange(self.mt["checkpoints"])
            tasks = [self.workspace.task(spec, classes)
                     for spec, classes in zip(self.specs, self.workspace.draw_classes(self.specs, rng))]
            threshold, tbptt = curriculum_at(self.config, episode)
            self.running[slot] = RunningEpisode(episode, checkpoint, threshold, tbptt)
            checkpoints.append(checkpoint)
            thresholds.append(threshold)
            keys.append(seed)
            heads.append(self._fresh_heads(tasks, seed))
            old_sets.append([self.sampler.sampling_set([self.source] + tasks[:p], self._set_width)
                             for p in range(len(tasks))])
            new_sets.append([self.sampler.sampling_set([tasks[p]], self._set_width, first_task=1 + p)
                             for p in range(len(tasks))])
        ckpt = torch.tensor(checkpoints, device=dev)
        st = self.state
        rows = [self._slot_rows(g, slots) for g in range(len(self.meta.groups))]
        w0 = [pool["flats"][g][ckpt].reshape(-1, group.dims.K) for g, group in enumerate(self.meta.groups)]
        weights = [w.index_copy(0, r, v) for w, r, v in zip(st.teacher, rows, w0)]
        student = [w.index_copy(0, r, v) for w, r, v in zip(st.student, rows, w0)]
        plain = {n: _slot_copy(t, slots, pool["plain"][n][ckpt]) for n, t in st.teacher_plain.items()}
        new_heads = [pool["head"][ckpt]] + [torch.stack([h[t] for h in heads]).to(dev)
                                            for t in range(len(self.specs))]
        heads_t = [h.index_copy(0, slots, v.to(h.dtype)) for h, v in zip(st.teacher_heads, new_heads)]
        heads_s = [h.index_copy(0, slots, v.to(h.dtype)) for h, v in zip(st.student_heads, new_heads)]
        lstm = MetaState([h.index_fill(1, r, 0.0) for h, r in zip(st.lstm.h, rows)],
                         [c.index_fill(1, r, 0.0) for c, r in zip(st.lstm.c, rows)])

        def sets(old: SamplingSet, new: list[list[SamplingSet]]) -> SamplingSet:
            values = [torch.stack([torch.stack([getattr(s, f) for s in phases]) for phases in new])
                      for f in ("rows", "task", "label")]
            return SamplingSet(*(t.index_copy(0, slots, v) for t, v in zip((old.rows, old.task, old.label), values)))

        zero = torch.zeros(len(starts), dtype=torch.int64, device=dev)
        self.state = replace(
            st, teacher=weights, teacher_plain=plain, teacher_heads=heads_t, student=student,
            student_plain={n: t.clone() for n, t in plain.items()}, student_heads=heads_s, lstm=lstm,
            old_sets=sets(st.old_sets, old_sets), new_sets=sets(st.new_sets, new_sets),
            key=st.key.index_copy(0, slots, torch.tensor(keys, device=dev)),
            active=st.active.index_fill(0, slots, True), phase=st.phase.index_copy(0, slots, zero),
            steps=st.steps.index_copy(0, slots, zero), phase_steps=st.phase_steps.index_copy(0, slots, zero),
            threshold=st.threshold.index_copy(0, slots, torch.tensor(thresholds, device=dev,
                                                                      dtype=st.threshold.dtype)),
            ended=st.ended.index_copy(0, slots, zero))

    def _slot_rows(self, group_index: int, slots: torch.Tensor) -> torch.Tensor:
        """Positions of ``slots``' rows in a group's slot layout (tensor by tensor, slot by slot)."""
        group, S = self.meta.groups[group_index], self.slots
        starts, offset = [], 0
        for r in group.rows:
            starts.append((offset, r))
            offset += S * r
        return torch.cat([torch.cat([start + s * r + torch.arange(r, device=slots.device) for start, r in starts])
                          for s in slots.tolist()])

    def _fresh_heads(self, tasks: list, seed: int) -> list[torch.Tensor]:
        """The new tasks' heads (weight | bias), shared by teacher and student, from the episode's seed:
        ``nn.Linear``'s initialisation, drawn task after task."""
        generator = torch.Generator().manual_seed(seed)
        dtype = next(self.meta.parameters()).dtype
        heads = []
        for task in tasks:
            bound = 1.0 / math.sqrt(self._dim)
            weight = torch.rand(task.num_classes, self._dim, generator=generator) * 2 * bound - bound
            bias = torch.rand(task.num_classes, generator=generator) * 2 * bound - bound
            heads.append(torch.cat([weight, bias[:, None]], 1).to(dtype))
        return heads

    # ----- one window -----
    def run_window(self) -> list[EpisodeRecord]:
        """Start episodes on idle slots, run one T-BPTT window on the device, then read its losses
        and the slots' ends once; returns the episodes that finished."""
        self.start_episodes()
        if not self.running:
            return []
        latest = max(ep.episode for ep in self.running.values())
        _, length = curriculum_at(self.config, latest)
        losses, kept = [], []
        for _ in range(length):
            step_losses, keep = self.inner_step()
            losses.append(step_losses)
            kept.append(keep)
            if self.end_windows_early and not self.state.active.any():
                break
        self.state = self.state.detach()
        return self._record(len(losses), torch.stack(losses), torch.stack(kept))

    def inner_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One inner step of every slot with its meta-update, on the device: returns the per-slot
        losses and which of them counted (``[S]`` each)."""
        state, losses = self.unroll.step(self.meta.snapshot(), self.state)
        counted = state.active & torch.isfinite(losses)
        gradient_finite = self.meta_update(losses, counted)
        self.state, kept = self.unroll.finish(state, losses, gradient_finite)
        return losses.detach(), kept

    def meta_update(self, losses: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
        """An Adam step on θ from the mean of the counted slots' losses, back-propagated through the
        current T-BPTT window; returns (on the device) whether θ's gradient was finite.  A step with
        no counted slot or a non-finite gradient changes nothing."""
        with nvtx_range("meta_backward"):
            params = list(self.meta.parameters())
            objective = torch.where(counted, losses, 0).sum() / counted.sum().clamp(min=1)
            grads = torch.autograd.grad(objective, params, retain_graph=True, allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            self.optimizer.step(grads, finite & counted.any())
        return finite

    def _record(self, length: int, losses: torch.Tensor, kept: torch.Tensor) -> list[EpisodeRecord]:
        """The window's one host read, and the bookkeeping of every slot's episode."""
        st = self.state
        values = torch.cat([torch.where(kept, losses, torch.nan).flatten().double()]
                           + [t.double() for t in (st.active, st.ended, st.steps, st.phase)])
        host = values.tolist()
        S = self.slots
        table = [host[k * S:(k + 1) * S] for k in range(length)]
        active, ended, steps, phase = (host[length * S + i * S: length * S + (i + 1) * S] for i in range(4))
        finished = []
        self.progress.windows += 1
        for slot in sorted(self.running):
            episode = self.running[slot]
            episode.losses += [row[slot] for row in table if not math.isnan(row[slot])]
            self.progress.inner_steps += int(steps[slot]) - episode.steps
            episode.steps = int(steps[slot])
            if active[slot]:
                continue
            del self.running[slot]
            reason = END_REASONS[int(ended[slot])] if int(ended[slot]) != RUNNING else "horizon"
            losses_ = episode.losses
            record = EpisodeRecord(episode.episode, int(steps[slot]), losses_[-1] if losses_ else float("nan"),
                                   sum(losses_) / len(losses_) if losses_ else float("nan"), episode.threshold,
                                   episode.tbptt, reason, episode.checkpoint, int(phase[slot]) + 1)
            self.progress.nonfinite += reason == "nonfinite"
            self.progress.episode += 1
            self.progress.history.append(asdict(record))
            finished.append(record)
        return finished

    # ----- checkpoints -----
    def state_dict(self) -> dict:
        return {"meta": self.meta.state_dict(), "optimizer": self.optimizer.state_dict(),
                "slots": self.state.tensors(), "running": {s: asdict(e) for s, e in self.running.items()},
                "progress": asdict(self.progress), "config": self.config}

    def load_state_dict(self, state: dict) -> None:
        self.meta.load_state_dict(state["meta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.state = SlotState.from_tensors(_to(state["slots"], self.device))
        self.running = {int(s): RunningEpisode(**e) for s, e in state["running"].items()}
        self.progress = TrainerProgress(**state["progress"])
        self._saved_windows = self.progress.windows

    def save(self) -> None:
        if self.run_dir is not None:
            _io.torch_save(self.state_dict(), self.run_dir / CHECKPOINT)
        self._saved_at = time.perf_counter()
        self._saved_windows = self.progress.windows

    def resume(self, run_dir: Path) -> bool:
        """Continue from ``run_dir``'s checkpoint if there is one; returns whether there was."""
        path = Path(run_dir) / CHECKPOINT
        if not path.exists():
            return False
        fresh = self.state_dict()
        state = read_checkpoint(path, self.config, {k: fresh[k] for k in ("meta", "optimizer", "slots")})
        try:
            self.load_state_dict(state)
        except (TypeError, KeyError, ValueError, RuntimeError) as exc:  # episode records of another layout
            raise UserError(f"cannot resume from {path}: {first_line(exc)}; delete it to restart meta-training") from None
        return True

    # ----- the whole run -----
    def train(self, progress: bool = True, stop_after: Optional[int] = None) -> MetaLearner:
        """Run the remaining episodes (until ``stop_after`` have finished, if given), a window at a
        time, checkpointing every ``save_every`` finished episodes, at the end of each curriculum
        stage, every ``checkpoint_minutes`` and at the end; the finished meta-learner goes to
        ``metalearner.pt``.  Stops with a UserError (after a checkpoint) once more than
        ``max_nonfinite_fraction`` of the finished episodes ended non-finite."""
        total = self.mt["episodes"]
        until = total if stop_after is None else min(stop_after, total)
        self._checkpoint_pool()  # pre-training w0 is not meta-training time
        self._start = time.perf_counter()
        bar = tqdm(total=total, initial=self.progress.episode, desc="meta-training", disable=not progress,
                   dynamic_ncols=True)
        while self.progress.episode < until and (self.running or self.progress.started < total):
            before = self.progress.episode
            finished = self.run_window()
            bar.update(len(finished))
            if finished:
                last = finished[-1]
                bar.set_postfix(ep=last.episode, loss=f"{last.final_loss:.2f}", thr=last.threshold,
                                tbptt=last.tbptt, nonfinite=self.progress.nonfinite,
                                its=f"{self.steps_per_second:.2f}/s")
            # Due: every save_every finished episodes, at the end of each curriculum stage, and
            # every checkpoint_minutes.
            due = any(self.progress.episode // self.mt[key] > before // self.mt[key]
                      for key in ("save_every", "curriculum_every"))
            stop = self.too_many_nonfinite()
            if due or stop or time.perf_counter() - self._saved_at > 60 * self.mt["checkpoint_minutes"]:
                self._checkpoint()
            if stop:
                bar.close()
                raise UserError(self.nonfinite_message())
        bar.close()
        if self.progress.windows != self._saved_windows:
            self._checkpoint()
        if self.run_dir is not None and self.progress.episode == total:
            save_metalearner(self.meta, self.run_dir / METALEARNER, arch=self.config["arch"], config=self.config)
            _io.write_json(self.run_dir / "metatrain.json", asdict(self.progress))
        return self.meta

    def too_many_nonfinite(self) -> bool:
        """More than ``metatrain.max_nonfinite_fraction`` of the finished episodes ended non-finite."""
        p = self.progress
        return (p.episode >= min(NONFINITE_JUDGED_AFTER, self.mt["episodes"])
                and p.nonfinite > self.mt["max_nonfinite_fraction"] * p.episode)

    def nonfinite_message(self) -> str:
        p, mt = self.progress, self.mt
        return (f"meta-training stopped: {p.nonfinite} of {p.episode} finished episodes ended with a non-finite "
                f"loss (more than metatrain.max_nonfinite_fraction={mt['max_nonfinite_fraction']:g}); a learning "
                f"rate is likely too large: lower metatrain.lr (the student's, now {mt['lr']:g}) or "
                f"metatrain.meta_lr (θ's Adam, now {mt['meta_lr']:g})")

    def _checkpoint(self) -> None:
        self.progress.seconds += time.perf_counter() - self._start
        self._start = time.perf_counter()
        self.save()

    @property
    def steps_per_second(self) -> float:
        """Episode-steps (steps of running slots) per second of meta-training."""
        elapsed = self.progress.seconds + (time.perf_counter() - self._start)
        return self.progress.inner_steps / max(elapsed, 1e-9)


def read_checkpoint(path: Path, config: dict, fresh: dict) -> dict:
    """The meta-training checkpoint at ``path`` (on the CPU), checked before anything uses it: a
    checkpoint of ``config`` (bookkeeping keys aside) whose parts named in ``fresh`` (a new trainer's
    ``state_dict()`` entries) have their layout, with finite θ.  Anything else is a UserError."""
    fix = "delete it to restart meta-training"
    state = _io.torch_load(path, "the meta-training checkpoint", fix)
    keys = ("meta", "optimizer", "slots", "running", "progress", "config")
    if not isinstance(state, dict) or sorted(state) != sorted(keys) or not isinstance(state["config"], dict):
        raise UserError(f"{path} is not a meta-training checkpoint; {fix}")
    changes = computation_changes(state["config"], config)
    if changes:
        raise UserError(f"{path} is the checkpoint of another configuration ({', '.join(changes[:3])}); {fix}")
    for part, expected in fresh.items():
        mismatch = _io.layout_difference(state[part], expected, part)
        if mismatch:
            raise UserError(f"{path} does not fit this run's {config['arch']} network ({mismatch}); {fix}")
    if not all(torch.isfinite(t).all() for t in state["meta"].values() if t.is_floating_point()):
        raise UserError(f"{path} holds a non-finite θ; {fix}")
    return state


def _to(tree, device, dtype: Optional[torch.dtype] = None):
    """``tree`` (nested dicts and lists of tensors) on ``device``; floating tensors in ``dtype`` if given."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, dtype) if dtype is not None and tree.is_floating_point() else tree.to(device)
    if isinstance(tree, dict):
        return {k: _to(v, device, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to(v, device, dtype) for v in tree)
    return tree


def _slot_copy(folded: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``folded [S·C, ...]`` with the blocks of ``slots`` replaced by ``values [n, C, ...]``."""
    S = folded.shape[0] // values.shape[1]
    return folded.view(S, *values.shape[1:]).index_copy(0, slots, values).view_as(folded)
