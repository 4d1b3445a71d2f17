"""One experiment end to end: data, pre-trained ``w0``, and the meta-test protocol (DESIGN §1.5–1.6).

``Experiment(config)`` is the Python API the CLI is a thin layer over::

    exp = Experiment(build_config("exp1", suite="fmnist", preset="smoke"), device="cpu")
    results = exp.run(["sgd", "teacher"])      # results.json's content
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import _io
from .data import ImageDataset, Task, TaskSampler, load_dataset, make_task, resolve_data_root
from .errors import UserError
from .methods import Method, method_class
from .models import ARCHITECTURES, ResNetGN
from .readout import ReadoutSet
from .training import head_accuracy, steps_for_epochs, train_supervised


@dataclass
class TaskPair:
    """A task as trained on, and the (possibly smaller) set its readout uses."""

    train: Task
    readout: ReadoutSet

    @property
    def name(self) -> str:
        return self.train.name


def spec_key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class Experiment:
    """Data, checkpoints and the meta-test of one configuration (``experiments.build_config``)."""

    def __init__(self, config: dict, *, data_root=None, out_dir=None, device: str | torch.device = "cpu",
                 progress: bool = True, download: bool = True):
        self.config = config
        self.device = torch.device(device)
        self.data_root = resolve_data_root(data_root)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.download = download
        self._datasets: dict[str, ImageDataset] = {}
        self._states: dict[tuple, dict] = {}

    # ----- data -----
    def dataset(self, name: str) -> ImageDataset:
        if name not in self._datasets:
            self._datasets[name] = load_dataset(name, self.data_root, download=self.download,
                                                progress=self.progress)
        return self._datasets[name]

    def task(self, spec: dict, classes: Sequence[int], *, readout: bool = False, seed: int = 0) -> Task:
        """The task of ``spec``'s dataset with ``classes``; ``readout`` applies the preset's subset sizes."""
        ro = self.config["readout"]
        return make_task(self.dataset(spec["dataset"]), tuple(classes), train_part=spec["train_part"],
                         max_train=(ro["max_train"] or None) if readout else None,
                         max_test=(ro["max_test"] or None) if readout else None, seed=seed)

    def pair(self, spec: dict, classes: Sequence[int], seed: int = 0) -> TaskPair:
        ro = self.config["readout"]
        return TaskPair(self.task(spec, classes),
                        ReadoutSet(self.task(spec, classes, readout=True, seed=seed), self.device,
                                   steps=ro["steps"], lr=ro["lr"], seed=seed))

    def draw_classes(self, specs: Sequence[dict], rng: random.Random) -> list[tuple[int, ...]]:
        """Classes of each new task: fixed ones, or ``ways`` drawn from the pool, disjoint
        from the other tasks drawn from the same pool in this call."""
        used: set[int] = set()
        out = []
        for spec in specs:
            if "classes" in spec:
                out.append(tuple(spec["classes"]))
                continue
            free = [c for c in spec["pool"] if c not in used]
            if len(free) < spec["ways"]:
                raise UserError(f"cannot draw {spec['ways']} classes from pool {spec['pool']} "
                                f"({len(free)} left after the other tasks)")
            classes = tuple(sorted(rng.sample(free, spec["ways"])))
            used.update(classes)
            out.append(classes)
        return out

    @property
    def source_spec(self) -> dict:
        return self.config["tasks"]["source"]

    def source_task(self) -> Task:
        return self.task(self.source_spec, self.source_spec["classes"])

    # ----- the pre-trained network w0 -----
    def new_model(self, head_classes: Sequence[int] = ()) -> ResNetGN:
        channels = self.dataset(self.source_spec["dataset"]).channels
        return ARCHITECTURES[self.config["arch"]](channels, head_classes).to(self.device)

    @property
    def cache_dir(self) -> Path:
        return self.data_root / "checkpoints"

    def cached_state(self, kind: str, index: int, build: Callable[[], dict], extra: Optional[dict] = None) -> dict:
        """A network state of ``kind`` (``w0``, a baseline's backbone, ...) from the disk cache, or
        ``build()`` it and cache it.  The key holds everything that shapes it: architecture, Task A,
        pre-training settings, seed, ``index`` and ``extra``; a JSON file beside it holds the facts."""
        c = self.config
        key = spec_key({"kind": kind, "arch": c["arch"], "source": self.source_spec, "pretrain": c["pretrain"],
                        "seed": c["seed"], "index": index, "extra": extra})
        path = self.cache_dir / f"{kind}-{c['suite']}-{c['preset']}-seed{c['seed']}-{index}-{key}.pt"
        memo = (kind, index, key)
        if memo in self._states:
            return self._states[memo]
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # a truncated or foreign file
                raise UserError(f"the cached network {path} cannot be read ({exc}); delete it to rebuild it") from None
        else:
            state = build()
            _io.torch_save(state, path)
            _io.write_json(path.with_suffix(".json"), {k: v for k, v in state.items() if k != "model"})
        self._states[memo] = state
        return state

    def pretrained_state(self, index: int = 0) -> dict:
        """``w0``: the network pre-trained on Task A (head 0), cached on disk; ``index`` picks one
        of Experiment 3's checkpoints (each its own seed)."""
        def build() -> dict:
            task = self.source_task()
            p = self.config["pretrain"]
            seed = self.config["seed"] * 1000 + index
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self.new_model([task.num_classes])
            steps = steps_for_epochs([task], p["epochs"], p["batch_size"])
            train_supervised(model, [task], steps=steps, lr=p["lr"], momentum=p["momentum"],
                             weight_decay=p["weight_decay"], batch_size=p["batch_size"],
                             warmup_fraction=p["warmup_fraction"], device=self.device, seed=seed,
                             desc=f"pre-training w0 #{index} on {task.name}", progress=self.progress)
            return {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "task": task.name,
                    "steps": steps, "test_accuracy": head_accuracy(model, task, 0, self.device)}

        return self.cached_state("w0", index, build)

    @property
    def metatest_checkpoint(self) -> int:
        """Experiment 3 meta-tests on a checkpoint unseen in meta-training (the last one)."""
        return self.config["metatrain"]["checkpoints"] if self.config["experiment"] == "exp3" else 0

    def pretrained_model(self, index: Optional[int] = None) -> ResNetGN:
        state = self.pretrained_state(self.metatest_checkpoint if index is None else index)
        model = self.new_model([self.source_task().num_classes])
        model.load_state_dict(state["model"])
        return model

    # ----- the meta-test protocol -----
    def eval_steps(self) -> list[int]:
        m = self.config["metatest"]
        total = m["steps_per_task"] * len(self.config["tasks"]["meta_test"])
        steps = sorted(set(range(0, total + 1, m["eval_every"])) | {
            m["steps_per_task"] * k for k in range(len(self.config["tasks"]["meta_test"]) + 1)})
        return steps

    def run_tasks(self, run: int) -> list[TaskPair]:
        """Task A then the new tasks of run ``run`` (drawn with the run's seed; same for every method)."""
        seed = self.run_seed(run)
        specs = self.config["tasks"]["meta_test"]
        classes = self.draw_classes(specs, random.Random(seed))
        return [self.pair(self.source_spec, self.source_spec["classes"], seed=seed)] + [
            self.pair(spec, cls, seed=seed) for spec, cls in zip(specs, classes)]

    def run_seed(self, run: int) -> int:
        return self.config["seed"] * 1000 + run

    def run_method(self, method: Method, run: int, tasks: Sequence[TaskPair]) -> dict[int, dict[int, tuple]]:
        """Meta-test one method for one run: ``{eval step: {task index: (readout, original)}}``.
        The global RNG (new heads' initialisation) is seeded by the run, so every method of a run
        starts its new heads from the same weights and a run repeats exactly."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.run_seed(run))
            return self._run_method(method, run, tasks)

    def _run_method(self, method: Method, run: int, tasks: Sequence[TaskPair]) -> dict[int, dict[int, tuple]]:
        m = self.config["metatest"]
        steps, every = m["steps_per_task"], m["eval_every"]
        model = method.initial_model(run).to(self.device)
        learner = method.learner(model, run)
        seed = self.run_seed(run)
        curve: dict[int, dict[int, tuple]] = {}

        def evaluate(step: int, task_indices: Sequence[int]) -> None:
            for t in task_indices:
                r = tasks[t].readout.evaluate(learner.features(t), learner.head(t))
                curve.setdefault(step, {})[t] = (r.readout, r.original)

        new_tasks = tasks[1:]
        total = steps * len(new_tasks)
        bar = tqdm(total=total, desc=f"{method.name} run {run + 1}", disable=not self.progress, leave=False,
                   dynamic_ncols=True)
        for phase, pair in enumerate(new_tasks):
            index = phase + 1
            if model.add_head(pair.train.num_classes) != index:
                raise RuntimeError(f"{method.name}: the network should have {index} heads before task {index + 1}")
            learner.begin_task(index, pair.train)
            evaluate(phase * steps, range(index + 1) if phase == 0 else [index])
            new = TaskSampler([pair.train], m["batch_size"], device=self.device, seed=seed * 10 + index)
            old = (TaskSampler([p.train for p in tasks[:index]], m["batch_size"], device=self.device,
                               seed=seed * 10 + index + 5) if method.needs_old_data else None)
            for step in range(1, steps + 1):
                learner.step(new.sample(), old.sample() if old is not None else None)
                bar.update(1)
                global_step = phase * steps + step
                if global_step % every == 0 or step == steps:
                    evaluate(global_step, range(index + 1))
        bar.close()
        return curve

    def run(self, methods: Sequence[str]) -> dict:
        """Meta-test ``methods`` over every run; returns the ``results.json`` content."""
        instances = [method_class(name)(self, self.config["methods"].get(name, {})) for name in methods]
        for method in instances:
            method.prepare()
        curves = {name: [] for name in methods}
        task_names = []
        for run in range(self.config["runs"]):
            tasks = self.run_tasks(run)
            task_names.append([t.name for t in tasks])
            for method in instances:
                curves[method.name].append(self.run_method(method, run, tasks))
        results = self.summarise(curves, task_names)
        for method in instances:
            results["methods"][method.name]["info"] = method.info()
            if self.out_dir is not None:
                method.write_artifacts(self.out_dir)
        return results

    def summarise(self, curves: dict[str, list[dict]], task_names: list[list[str]]) -> dict:
        steps = self.eval_steps()
        n_tasks = len(task_names[0])
        out = {"experiment": self.config["experiment"], "suite": self.config["suite"],
               "preset": self.config["preset"], "eval_steps": steps, "task_names": task_names, "methods": {}}
        for name, runs in curves.items():
            entry = {"readout": {}, "original": {}, "runs": {"readout": {}, "original": {}}}
            for kind, slot in (("readout", 0), ("original", 1)):
                for t in range(n_tasks):
                    values = np.array([[_value(run, s, t, slot) for s in steps] for run in runs], dtype=float)
                    key = f"task{t + 1}"
                    seen = ~np.isnan(values).any(axis=0)  # a task is not seen before it starts
                    entry[kind][key] = {
                        "mean": [float(v) if ok else None for v, ok in zip(values.mean(0), seen)],
                        "std": [float(v) if ok else None for v, ok in zip(values.std(0), seen)],
                    }
                    entry["runs"][kind][key] = [[None if np.isnan(v) else float(v) for v in row] for row in values]
            out["methods"][name] = entry
        return out


def _value(curve: dict, step: int, task: int, slot: int) -> float:
    value = curve.get(step, {}).get(task)
    return float("nan") if value is None or value[slot] is None else value[slot]


def curves_csv(results: dict) -> str:
    """``results`` in long form: one line per method, kind, task, step and run."""
    lines = ["method,kind,task,step,run,accuracy"]
    steps = results["eval_steps"]
    for name, entry in results["methods"].items():
        for kind, tasks in entry["runs"].items():
            for task, runs in tasks.items():
                for run, row in enumerate(runs):
                    for step, value in zip(steps, row):
                        if value is not None:
                            lines.append(f"{name},{kind},{task},{step},{run},{value:.6f}")
    return "\n".join(lines) + "\n"


def save_results(results: dict, out_dir: str | Path) -> list[Path]:
    """Write ``results.json``, ``curves.csv`` and the figures into ``out_dir`` (atomically)."""
    from .plots import write_figures

    out_dir = Path(out_dir)
    _io.write_json(out_dir / "results.json", results)
    _io.write_text(out_dir / "curves.csv", curves_csv(results))
    return [out_dir / "results.json", out_dir / "curves.csv"] + write_figures(results, out_dir)
