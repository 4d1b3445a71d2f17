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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .. import _io
from ..data.sampler import SamplingSet, SlotSampler
from ..distributed import SINGLE, Ranks
from ..errors import UserError, first_line
from ..experiments import computation_changes, curriculum_at
from ..models import runs_slots
from ..profiling import nvtx_range
from ..workspace import Workspace
from .metalearner import MetaLearner, tapped_layers
from .optimizer import save_metalearner
from .unroll import END_REASONS, RUNNING, SlotState, Unroll

CHECKPOINT = "metatrain_checkpoint.pt"
METALEARNER = "metalearner.pt"
# The share of non-finite episodes is judged once this many episodes have finished (all of them,
# in shorter runs), so that one unlucky episode among the first few does not stop a run.
NONFINITE_JUDGED_AFTER = 10
# Slots per device when ``metatrain.parallel_episodes`` is 0 (auto).  On the CPU, measured: a
# folded network of S slots costs more than S networks (grouped convolutions are slower than
# plain ones in oneDNN), so one slot is fastest.  On CUDA: provisional, until measured.  An
# architecture without Slot layers runs one slot.
AUTO_SLOTS = {"cpu": 1, "cuda": 16}


def job_slots(parallel_episodes: int, device_type: str, folds: bool, world: int) -> int:
    """The episode slots of the whole job: ``metatrain.parallel_episodes``, or when it is 0 (auto)
    ``AUTO_SLOTS`` of the device per rank (one for a network that does not fold slots)."""
    return parallel_episodes or (AUTO_SLOTS.get(device_type, 1) if folds else 1) * world


def how_episodes_ended(history: Sequence[dict]) -> dict[str, dict[str, int]]:
    """For each loss threshold of the curriculum (a key like ``"20"``), how many finished episodes ended
    by crossing it (a restart), at the horizon, or non-finite: whether restarts happen, and when."""
    counts: dict[str, dict[str, int]] = {}
    for record in history:
        stage = counts.setdefault(f"{record['threshold']:g}", dict.fromkeys(END_REASONS.values(), 0))
        stage[record["ended_by"]] += 1
    return counts


@dataclass
class EpisodeRecord:
    """One finished meta-training episode, as ``metatrain.csv``, the progress history and Figure 6 keep it."""

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
    """Meta-training's counters and history so far, saved in each checkpoint (and ``metatrain.json``) so that
    a resumed run counts on."""

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
        """One Adam step of ``params`` by ``grads`` where the device flag ``apply`` holds, none otherwise;
        every state tensor is updated in place, so a captured step replays on the same memory."""
        beta1, beta2 = self.betas
        self.count.add_(apply.to(self.count.dtype))
        step_size = self.lr / (1 - beta1 ** self.count)
        bias2_sqrt = (1 - beta2 ** self.count).sqrt()
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            m_new = m.lerp(g, 1 - beta1)
            v_new = (v * beta2).addcmul_(g, g, value=1 - beta2)
            p_new = p - step_size * m_new / (v_new.sqrt() / bias2_sqrt + self.eps)
            for old, new in ((m, m_new), (v, v_new), (p, p_new)):
                old.copy_(torch.where(apply, new, old))

    def state_dict(self) -> dict:
        """The moments and the step count (the live tensors) for the meta-training checkpoint."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Copy saved moments and step count into the existing tensors, in place (see ``step``)."""
        for mine, saved in ((self.exp_avg, state["exp_avg"]), (self.exp_avg_sq, state["exp_avg_sq"])):
            for t, s in zip(mine, saved):
                t.copy_(s)
        self.count.copy_(state["count"])


class MetaTrainer:
    """Runs Algorithm 1 for ``config["metatrain"]`` episodes on a workspace's tasks (any object with
    ``Workspace``'s ``config``, ``device``, ``new_model``, ``source_task``, ``task``, ``draw_classes``
    and ``pretrained_state`` will do)."""

    def __init__(self, workspace: Workspace, meta: Optional[MetaLearner] = None,
                 run_dir: Optional[Path] = None, ranks: Optional[Ranks] = None):
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
        # ``parallel_episodes`` counts the slots of the whole job; each rank runs its share.  A network
        # whose layers do not fold slots runs one per rank.
        ranks = ranks or getattr(workspace, "ranks", SINGLE)
        self.ranks = ranks
        folds = runs_slots(self.skeleton, self.meta.head_prefix)
        self.total_slots = job_slots(self.mt["parallel_episodes"], self.device.type, folds, ranks.world)
        if self.total_slots % ranks.world:
            raise UserError(f"metatrain.parallel_episodes={self.total_slots} episode slots do not divide among "
                            f"{ranks.world} ranks; choose a multiple of {ranks.world}")
        self.slots = self.total_slots // ranks.world
        self.first_slot = ranks.rank * self.slots
        if self.slots > 1 and not folds:
            raise UserError(f"{self.slots} episode slots per process, but the {self.config['arch']} network does "
                            "not fold episode slots (its layers are not Slot layers); set metatrain.parallel_episodes "
                            f"to {ranks.world}")
        self.optimizer = MaskedAdam(list(self.meta.parameters()), self.mt["meta_lr"])
        # On the CPU the device is the host: reading whether any slot still runs waits for nothing,
        # so a window ends as soon as every slot has stopped (no idle steps).  On an accelerator
        # nothing is read inside a window: stopped slots idle until it ends (so do all ranks' slots,
        # which step together).
        self.end_windows_early = self.device.type == "cpu" and ranks.world == 1
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
        self.running: dict[int, RunningEpisode] = {}  # by this rank's slot
        self.pending: list[int] = []  # episodes to start again first (resumed on another slot layout)
        self._start = time.perf_counter()
        self._saved_at = time.perf_counter()
        self._saved_windows = 0  # progress.windows at the last checkpoint

    # ----- episodes -----
    def episode_seed(self, episode: int) -> int:
        """Episode ``episode``'s seed (its classes, ``w0`` checkpoint, heads and batches): a function of the
        run's seed and the episode alone, whichever slot or rank runs it."""
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

    @property
    def group_rows(self) -> list[tuple[int, ...]]:
        """Per group of meta-nets, one slot's rows of each of its tensors (the slot layout)."""
        return [group.rows for group in self.meta.groups]

    def start_episodes(self) -> int:
        """Start the next episodes on the idle slots of the whole job, in slot order (masked writes on
        the device); returns the latest episode now running anywhere (-1: none)."""
        idle = [s for s in range(self.slots) if s not in self.running]
        latest = max((e.episode for e in self.running.values()), default=-1)
        job = self.ranks.all_gather((idle, latest))
        starts = []
        for rank, (rank_idle, rank_latest) in enumerate(job):
            latest = max(latest, rank_latest)
            for slot in rank_idle:
                if self.pending:
                    episode = self.pending.pop(0)
                elif self.progress.started < self.mt["episodes"]:
                    episode = self.progress.started
                    self.progress.started += 1
                else:
                    break
                latest = max(latest, episode)
                if rank == self.ranks.rank:
                    starts.append((slot, episode))
        fresh = []
        for slot, episode in starts:
            state, self.running[slot] = self._fresh_episode(episode)
            fresh.append(state)
        if fresh:
            self.state = self.state.put(self.group_rows, [slot for slot, _ in starts],
                                        SlotState.join(fresh, self.group_rows))
        return latest

    def _fresh_episode(self, episode: int) -> tuple[SlotState, RunningEpisode]:
        """Episode ``episode`` at its start, as a one-slot state: its classes and ``w0`` checkpoint
        drawn from its seed, teacher and student at ``w0``, fresh heads, zeroed meta-LSTM states."""
        seed = self.episode_seed(episode)
        rng = random.Random(seed)
        checkpoint = rng.randrange(self.mt["checkpoints"])
        tasks = [self.workspace.task(spec, classes)
                 for spec, classes in zip(self.specs, self.workspace.draw_classes(self.specs, rng))]
        threshold, tbptt = curriculum_at(self.config, episode)
        pool, dev = self._checkpoint_pool(), self.device
        dtype = next(self.meta.parameters()).dtype
        heads = [pool["head"][checkpoint]] + [h.to(dev) for h in self._fresh_heads(tasks, seed)]

        def sets(tables: list[SamplingSet]) -> SamplingSet:
            return SamplingSet(*(torch.stack([getattr(t, f) for t in tables])[None] for f in ("rows", "task", "label")))

        old = sets([self.sampler.sampling_set([self.source] + tasks[:p], self._set_width) for p in range(len(tasks))])
        new = sets([self.sampler.sampling_set([tasks[p]], self._set_width, first_task=1 + p)
                    for p in range(len(tasks))])
        w0 = [flats[checkpoint] for flats in pool["flats"]]
        plain = {n: t[checkpoint] for n, t in pool["plain"].items()}

        def one(value, dtype=torch.int64) -> torch.Tensor:
            return torch.tensor([value], dtype=dtype, device=dev)

        state = SlotState(teacher=w0, teacher_plain=plain, teacher_heads=[h[None] for h in heads],
                          student=[w.clone() for w in w0], student_plain=dict(plain),
                          student_heads=[h[None].clone() for h in heads],
                          lstm=self.meta.initial_state(dev, dtype), old_sets=old, new_sets=new, key=one(seed),
                          active=one(True, torch.bool), phase=one(0), steps=one(0), phase_steps=one(0),
                          threshold=one(threshold, dtype), ended=one(RUNNING))
        return state, RunningEpisode(episode, checkpoint, threshold, tbptt)

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
        latest = self.start_episodes()
        if latest < 0:
            return []
        _, length = curriculum_at(self.config, latest)
        losses, kept = self.window_steps(length, stop_early=self.end_windows_early)
        return self._record(losses.shape[0], losses, kept)

    def window_steps(self, length: int, stop_early: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``length`` inner steps of every slot, then a truncation: the T-BPTT window on the device.
        Returns the per-step losses and which counted (``[steps, S]``).  Without ``stop_early`` it
        reads nothing back to the host, so it can be captured (a CUDA graph) as a whole."""
        losses, kept = [], []
        for _ in range(length):
            step_losses, keep = self.inner_step()
            losses.append(step_losses)
            kept.append(keep)
            if stop_early and not self.state.active.any():
                break
        self.state = self.state.detach()
        return torch.stack(losses), torch.stack(kept)

    def inner_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One inner step of every slot with its meta-update, on the device: returns the per-slot
        losses and which of them counted (``[S]`` each)."""
        state, losses = self.unroll.step(self.meta.snapshot(), self.state)
        gradient_finite, nonfinite_loss = self.meta_update(losses, state.active)
        self.state, kept = self.unroll.finish(state, losses, gradient_finite, nonfinite_loss)
        return losses.detach(), kept

    def meta_update(self, losses: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An Adam step on θ from the mean, over every rank's slots, of the counted losses' gradients
        (back-propagated through the current T-BPTT window).  Returns, on the device, whether θ's
        gradient was finite and whether any slot's loss was not.  A step with no counted slot or a
        non-finite gradient changes nothing."""
        with nvtx_range("meta_backward"):
            params = list(self.meta.parameters())
            counted = active & torch.isfinite(losses)
            grads = torch.autograd.grad(torch.where(counted, losses, 0).sum(), params, retain_graph=True,
                                        allow_unused=True)
            grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
            counts = torch.stack([counted.sum(), (active & ~torch.isfinite(losses)).sum()]).to(params[0].dtype)
            if self.ranks.world > 1:  # one bucket: every gradient and both counts, summed over the ranks
                flat = self.ranks.all_sum(torch.cat([g.flatten() for g in grads] + [counts]))
                grads = [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in params] + [2]), params)]
                counts = flat[-2:]
            grads = [g / counts[0].clamp(min=1) for g in grads]
            finite = torch.stack([torch.isfinite(g).all() for g in grads]).all()
            self.optimizer.step(grads, finite & (counts[0] > 0))
        return finite, counts[1] > 0

    def _record(self, length: int, losses: torch.Tensor, kept: torch.Tensor) -> list[EpisodeRecord]:
        """The window's one host read, the bookkeeping of every slot's episode, and the episodes
        that finished on any rank (in episode order)."""
        st = self.state
        values = torch.cat([torch.where(kept, losses, torch.nan).flatten().double()]
                           + [t.double() for t in (st.active, st.ended, st.steps, st.phase)])
        host = values.tolist()
        S = self.slots
        table = [host[k * S:(k + 1) * S] for k in range(length)]
        active, ended, steps, phase = (host[length * S + i * S: length * S + (i + 1) * S] for i in range(4))
        finished, new_steps = [], 0
        for slot in sorted(self.running):
            episode = self.running[slot]
            episode.losses += [row[slot] for row in table if not math.isnan(row[slot])]
            new_steps += int(steps[slot]) - episode.steps
            episode.steps = int(steps[slot])
            if active[slot]:
                continue
            del self.running[slot]
            reason = END_REASONS[int(ended[slot])] if int(ended[slot]) != RUNNING else "horizon"
            losses_ = episode.losses
            finished.append(EpisodeRecord(
                episode.episode, int(steps[slot]), losses_[-1] if losses_ else float("nan"),
                sum(losses_) / len(losses_) if losses_ else float("nan"), episode.threshold, episode.tbptt, reason,
                episode.checkpoint, int(phase[slot]) + 1))
        job = self.ranks.all_gather((finished, new_steps))
        finished = sorted((record for records, _ in job for record in records), key=lambda r: r.episode)
        self.progress.windows += 1
        self.progress.inner_steps += sum(n for _, n in job)
        for record in finished:
            self.progress.nonfinite += record.ended_by == "nonfinite"
            self.progress.episode += 1
            self.progress.history.append(asdict(record))
        return finished

    # ----- checkpoints -----
    def state_dict(self) -> Optional[dict]:
        """Everything a resumption needs, on rank 0 (None on the others): θ, Adam, the progress,
        and every slot of the job, one by one, with the episode it runs."""
        slots = [_to(st.tensors(), "cpu") for st in self.state.split(self.group_rows)]
        running = {self.first_slot + s: asdict(e) for s, e in self.running.items()}
        job = self.ranks.all_gather((slots, running))
        if not self.ranks.writer:
            return None
        return {"meta": self.meta.state_dict(), "optimizer": self.optimizer.state_dict(),
                "slots": [slot for rank_slots, _ in job for slot in rank_slots],
                "running": {g: e for _, rank_running in job for g, e in rank_running.items()},
                "pending": list(self.pending), "progress": asdict(self.progress), "config": self.config}

    def load_state_dict(self, state: dict) -> None:
        """Resume from ``state_dict()``'s content.  With the job's slot count unchanged every slot
        goes on exactly (whatever the number of ranks); otherwise the running episodes start again."""
        self.meta.load_state_dict(state["meta"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = TrainerProgress(**state["progress"])
        running = {int(g): RunningEpisode(**e) for g, e in state["running"].items()}
        self.pending = list(state["pending"])
        if len(state["slots"]) == self.total_slots:
            mine = [SlotState.from_tensors(_to(t, self.device)) for t in
                    state["slots"][self.first_slot:self.first_slot + self.slots]]
            self.state = SlotState.join(mine, self.group_rows)
            self.running = {g - self.first_slot: e for g, e in running.items()
                            if self.first_slot <= g < self.first_slot + self.slots}
        else:
            self.state, self.running = self._idle_state(), {}
            self.pending = sorted(e.episode for e in running.values()) + self.pending
        self._saved_windows = self.progress.windows

    def save(self) -> None:
        """Write the checkpoint into the run folder (rank 0, if there is a folder); every rank calls it, since
        it gathers their slots."""
        state = self.state_dict()
        if self.run_dir is not None and state is not None:
            _io.torch_save(state, self.run_dir / CHECKPOINT)
        self._saved_at = time.perf_counter()
        self._saved_windows = self.progress.windows

    def resume(self, run_dir: Path) -> bool:
        """Continue from ``run_dir``'s checkpoint if there is one; returns whether there was."""
        path = Path(run_dir) / CHECKPOINT
        if not path.exists():
            return False
        slot = _to(self.state.select(self.group_rows, [0]).tensors(), "cpu")
        fresh = {"meta": self.meta.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "slots": [slot] * self.total_slots}
        state = read_checkpoint(path, self.config, fresh)
        check_episode_count(state, self.mt["episodes"])
        try:
            self.load_state_dict(state)
        except (TypeError, KeyError, ValueError, RuntimeError) as exc:  # episode records of another layout
            raise UserError(f"cannot resume from {path}: {first_line(exc)}; delete it to restart meta-training") from None
        return True

    # ----- the whole run -----
    def train(self, progress: bool = True, stop_after: Optional[int] = None,
              on_episode: Optional[Callable[[dict], None]] = None) -> MetaLearner:
        """Run the remaining episodes (until ``stop_after`` have finished, if given), a window at a
        time, checkpointing every ``save_every`` finished episodes, at the end of each curriculum
        stage, every ``checkpoint_minutes`` and at the end; the finished meta-learner goes to
        ``metalearner.pt``.  ``on_episode`` gets each finished episode's record (``EpisodeRecord``
        as a dict) as it finishes.  Stops with a UserError (after a checkpoint) once more than
        ``max_nonfinite_fraction`` of the finished episodes ended non-finite."""
        total = self.mt["episodes"]
        until = total if stop_after is None else min(stop_after, total)
        self._checkpoint_pool()  # pre-training w0 is not meta-training time
        self._start = time.perf_counter()
        bar = tqdm(total=total, initial=self.progress.episode, desc="meta-training",
                   disable=not (progress and self.ranks.writer), leave=False, dynamic_ncols=True)
        while self.progress.episode < until and self.progress.episode < total:
            before = self.progress.episode
            finished = self.run_window()
            bar.update(len(finished))
            if on_episode is not None:
                for record in finished:
                    on_episode(asdict(record))
            if finished:
                last = finished[-1]
                bar.set_postfix(ep=last.episode, loss=f"{last.final_loss:.2f}", thr=last.threshold,
                                tbptt=last.tbptt, nonfinite=self.progress.nonfinite,
                                its=f"{self.steps_per_second:.2f}/s")
            # Due: every save_every finished episodes, at the end of each curriculum stage, and
            # every checkpoint_minutes (every rank decides alike: the checkpoint gathers them all).
            due = any(self.progress.episode // self.mt[key] > before // self.mt[key]
                      for key in ("save_every", "curriculum_every"))
            stop = self.too_many_nonfinite()
            late = time.perf_counter() - self._saved_at > 60 * self.mt["checkpoint_minutes"]
            if due or stop or self.ranks.all_gather(late) != [False] * self.ranks.world:
                self._checkpoint()
            if stop:
                bar.close()
                raise UserError(self.nonfinite_message())
        bar.close()
        if self.progress.windows != self._saved_windows:
            self._checkpoint()
        if self.run_dir is not None and self.ranks.writer and self.progress.episode == total:
            save_metalearner(self.meta, self.run_dir / METALEARNER, arch=self.config["arch"], config=self.config)
            _io.write_json(self.run_dir / "metatrain.json", asdict(self.progress))
        return self.meta

    def too_many_nonfinite(self) -> bool:
        """More than ``metatrain.max_nonfinite_fraction`` of the finished episodes ended non-finite."""
        p = self.progress
        return (p.episode >= min(NONFINITE_JUDGED_AFTER, self.mt["episodes"])
                and p.nonfinite > self.mt["max_nonfinite_fraction"] * p.episode)

    def nonfinite_message(self) -> str:
        """The one-line error that stops a meta-training with too many non-finite episodes, naming the
        learning rates to lower."""
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
    keys = ("meta", "optimizer", "slots", "running", "pending", "progress", "config")
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


def check_episode_count(state: dict, episodes: int) -> None:
    """A resumed meta-training (checkpoint ``state``) may go on with another ``metatrain.episodes`` while no
    slot has gone idle for want of episodes and not below those started: it then trains exactly as a run
    started with ``episodes`` would.  Anything else is a UserError."""
    try:
        before, started = state["config"]["metatrain"]["episodes"], state["progress"]["started"]
    except (KeyError, TypeError):
        raise UserError("the run's metatrain_checkpoint.pt is not a meta-training checkpoint; "
                        "delete it to restart meta-training") from None
    if episodes == before:
        return
    if started >= before:
        raise UserError(f"metatrain.episodes cannot change on --resume: all {before} episodes of this run's "
                        f"meta-training have started; start a new run to train longer")
    if episodes < started:
        raise UserError(f"metatrain.episodes={episodes} is fewer than the {started} episodes this run has "
                        f"already started; set it to at least {started}")


def _to(tree, device, dtype: Optional[torch.dtype] = None):
    """``tree`` (nested dicts and lists of tensors) on ``device``; floating tensors in ``dtype`` if given."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, dtype) if dtype is not None and tree.is_floating_point() else tree.to(device)
    if isinstance(tree, dict):
        return {k: _to(v, device, dtype) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_to(v, device, dtype) for v in tree)
    return tree
