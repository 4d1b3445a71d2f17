"""The meta-test protocol (DESIGN §1.5–1.6): every method from ``w0`` on the new task(s) of each
run, readouts every ``eval_every`` steps, and the summary that becomes ``results.json``.

    workspace = Workspace(build_config("exp1", suite="fmnist", preset="smoke"), device="cpu")
    results = run_metatest(workspace, ["sgd", "teacher"])      # results.json's content
    save_results(results, "runs/example")
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import _io
from .data import Task, TaskSampler
from .errors import UserError
from .experiments import computation_changes
from .methods import Method, method_class
from .models import runs_slots
from .progress import OverallProgress
from .readout import ReadoutSet, evaluate_readouts
from .run_slots import RunRNGs, SlotNetwork, stack
from .workspace import Workspace

PROGRESS = "metatest_progress.pt"


@dataclass
class TaskPair:
    """A task as trained on, and the (possibly smaller) set its readout uses."""

    train: Task
    readout: ReadoutSet

    @property
    def name(self) -> str:
        """The trained task's name: the label of its readouts in the logs and ``results.json``."""
        return self.train.name


def task_pair(ws: Workspace, spec: dict, classes: Sequence[int], seed: int = 0) -> TaskPair:
    """The task of ``spec`` with ``classes`` and its readout set (the preset's seeded subset of it, with the
    readout's steps and lr), as a run uses them."""
    ro = ws.config["readout"]
    return TaskPair(ws.task(spec, classes), ReadoutSet(ws.task(spec, classes, readout=True, seed=seed),
                                                       device=ws.device, steps=ro["steps"], lr=ro["lr"], seed=seed))


def eval_steps(config: dict) -> list[int]:
    """The steps at which every task seen so far is read out: every ``eval_every`` and each task switch."""
    m = config["metatest"]
    tasks = len(config["tasks"]["meta_test"])
    total = m["steps_per_task"] * tasks
    return sorted(set(range(0, total + 1, m["eval_every"])) | {m["steps_per_task"] * k for k in range(tasks + 1)})


def run_tasks(ws: Workspace, run: int) -> list[TaskPair]:
    """Task A then the new tasks of run ``run`` (drawn with the run's seed; same for every method)."""
    seed = ws.run_seed(run)
    specs = ws.config["tasks"]["meta_test"]
    classes = ws.draw_classes(specs, random.Random(seed))
    return [task_pair(ws, ws.source_spec, ws.source_spec["classes"], seed=seed)] + [
        task_pair(ws, spec, cls, seed=seed) for spec, cls in zip(specs, classes)]


def add_task_head(method: Method, model: nn.Module, pair: TaskPair, index: int) -> None:
    """Give ``model`` the head of new task ``index`` (the global RNG draws it)."""
    if model.add_head(pair.train.num_classes) != index:
        raise RuntimeError(f"{method.name}: the network should have {index} heads before task {index + 1}")


def task_samplers(ws: Workspace, method: Method, tasks: Sequence[TaskPair], index: int,
                  seed: int) -> tuple[TaskSampler, Optional[TaskSampler]]:
    """A run's batches while it trains on task ``index``: of that task, and of the earlier ones if the
    method asks for old data; seeded by the run's ``seed`` and the task."""
    batch = ws.config["metatest"]["batch_size"]
    new = TaskSampler([tasks[index].train], batch, device=ws.device, seed=seed * 10 + index)
    old = (TaskSampler([p.train for p in tasks[:index]], batch, device=ws.device, seed=seed * 10 + index + 5)
           if method.needs_old_data else None)
    return new, old


def evaluates_at(config: dict, phase: int, step: int) -> bool:
    """Whether step ``step`` (from 1) of new task ``phase`` (from 0) ends with a readout of every task seen."""
    m = config["metatest"]
    return (phase * m["steps_per_task"] + step) % m["eval_every"] == 0 or step == m["steps_per_task"]


def run_method(ws: Workspace, method: Method, run: int, tasks: Sequence[TaskPair],
               overall: Optional[OverallProgress] = None) -> dict[int, dict[int, tuple]]:
    """Meta-test one method for one run: ``{eval step: {task index: (readout, original)}}``, each
    readout logged as it is made (``ws.log``); ``overall`` counts the steps.
    The global RNG (new heads' initialisation) is seeded by the run, so every method of a run
    starts its new heads from the same weights and a run repeats exactly."""
    with torch.random.fork_rng(devices=[ws.device] if ws.device.type == "cuda" else []):
        torch.manual_seed(ws.run_seed(run))
        return _run_method(ws, method, run, tasks, overall)


def _run_method(ws: Workspace, method: Method, run: int, tasks: Sequence[TaskPair],
                overall: Optional[OverallProgress]) -> dict[int, dict[int, tuple]]:
    steps = ws.config["metatest"]["steps_per_task"]
    model = method.initial_model(run).to(ws.device)
    learner = method.learner(model, run)
    seed = ws.run_seed(run)
    curve: dict[int, dict[int, tuple]] = {}

    def evaluate(step: int, task_indices: Sequence[int]) -> None:
        results = evaluate_readouts([(tasks[t].readout, learner.features(t), learner.head(t)) for t in task_indices])
        for t, r in zip(task_indices, results):
            curve.setdefault(step, {})[t] = (r.readout, r.original)
            ws.log.readout(method.name, run, step, t, tasks[t].name, r.readout, r.original)

    new_tasks = tasks[1:]
    total = steps * len(new_tasks)
    bar = tqdm(total=total, desc=f"{method.name} run {run + 1}", disable=not ws.progress, leave=False,
               dynamic_ncols=True)
    for phase, pair in enumerate(new_tasks):
        index = phase + 1
        add_task_head(method, model, pair, index)
        learner.begin_task(index, pair.train)
        evaluate(phase * steps, range(index + 1) if phase == 0 else [index])
        new, old = task_samplers(ws, method, tasks, index, seed)
        for step in range(1, steps + 1):
            learner.step(new.sample(), old.sample() if old is not None else None)
            bar.update(1)
            if overall is not None:
                overall.step()
            if evaluates_at(ws.config, phase, step):
                evaluate(phase * steps + step, range(index + 1))
    bar.close()
    return curve


def run_method_slots(ws: Workspace, method: Method, runs: Sequence[int], tasks: dict[int, Sequence[TaskPair]],
                     overall: Optional[OverallProgress] = None) -> dict[int, dict[int, dict[int, tuple]]]:
    """Meta-test runs ``runs`` of one method side by side, as the slots of one folded network
    (``run_slots``, the method's ``slot_learner``): ``{run: curve}``, each curve the one ``run_method``
    gives that run alone, up to round-off.  Each run draws its heads with its own RNG and its batches
    from its own samplers; every evaluation reads out all runs' tasks as one batched problem
    (``evaluate_readouts``)."""
    steps = ws.config["metatest"]["steps_per_task"]
    rngs = RunRNGs({run: ws.run_seed(run) for run in runs}, ws.device)
    models = []
    for run in runs:
        with rngs.use(run):
            models.append(method.initial_model(run).to(ws.device))
    network = SlotNetwork(models)
    learner = method.slot_learner(network, runs, rngs)
    curves: dict[int, dict[int, dict[int, tuple]]] = {run: {} for run in runs}

    def evaluate(step: int, task_indices: Sequence[int]) -> None:
        network.write_back()
        chosen = [(i, run, t) for i, run in enumerate(runs) for t in task_indices]
        results = evaluate_readouts([(tasks[run][t].readout, models[i], models[i].heads[t]) for i, run, t in chosen])
        for (_, run, t), r in zip(chosen, results):
            curves[run].setdefault(step, {})[t] = (r.readout, r.original)
            ws.log.readout(method.name, run, step, t, tasks[run][t].name, r.readout, r.original)

    phases = len(tasks[runs[0]]) - 1
    bar = tqdm(total=steps * phases, desc=f"{method.name} runs {', '.join(str(r + 1) for r in runs)}",
               disable=not ws.progress, leave=False, dynamic_ncols=True)
    for phase in range(phases):
        index = phase + 1
        for run, model in zip(runs, models):
            with rngs.use(run):
                add_task_head(method, model, tasks[run][index], index)
        network.add_head()
        learner.begin_task(index)
        evaluate(phase * steps, range(index + 1) if phase == 0 else [index])
        new, old = zip(*(task_samplers(ws, method, tasks[run], index, ws.run_seed(run)) for run in runs))
        for step in range(1, steps + 1):
            learner.step(stack([s.sample() for s in new]),
                         stack([s.sample() for s in old]) if method.needs_old_data else None)
            bar.update(1)
            if overall is not None:
                overall.step(len(runs))
            if evaluates_at(ws.config, phase, step):
                evaluate(phase * steps + step, range(index + 1))
    bar.close()
    return curves


def run_metatest(ws: Workspace, methods: Sequence[str], parallel_runs: int = 1) -> Optional[dict]:
    """Meta-test ``methods`` over every run; returns the ``results.json`` content (on rank 0; None on
    the others of a job of several ranks, which share the runs out: run r on rank r mod N).  Up to
    ``parallel_runs`` runs of a method that can (``Method.slot_learner``) go side by side, as slots of
    one folded network (``run_method_slots``).  One overall progress line follows it (closed, with the
    bars under it, however it ends).  With a run folder, each finished (method, run) is kept in
    ``metatest_progress.pt`` at once (after each round of runs with several ranks), and an interrupted
    meta-test continues from there."""
    if isinstance(parallel_runs, bool) or not isinstance(parallel_runs, int) or parallel_runs < 1:
        raise UserError(f"parallel_runs must be a positive integer, got {parallel_runs!r}")
    m = ws.config["metatest"]
    overall = OverallProgress(methods, ws.config["runs"], m["steps_per_task"] * len(ws.config["tasks"]["meta_test"]),
                              enabled=ws.progress)
    try:
        return _run_metatest(ws, methods, overall, parallel_runs)
    finally:
        overall.close()


def runs_side_by_side(method: Method) -> bool:
    """Whether ``method`` can train several runs as slots of one network (it gives a ``slot_learner``)."""
    return type(method).slot_learner is not Method.slot_learner


def _run_metatest(ws: Workspace, methods: Sequence[str], overall: OverallProgress,
                  parallel_runs: int) -> Optional[dict]:
    instances = [method_class(name)(ws, ws.config["methods"].get(name, {})) for name in methods]
    for method in instances:
        overall.preparing(method.name)
        method.prepare()
    progress = load_progress(ws)
    for method in instances:
        if method.name in progress["methods"]:
            method.load_state_dict(progress["methods"][method.name])
    ranks, runs = ws.ranks, ws.config["runs"]
    folds = parallel_runs > 1 and runs_slots(ws.new_model())
    mine = list(range(ranks.rank, runs, ranks.world))  # run r on rank r mod N
    rounds = math.ceil(math.ceil(runs / ranks.world) / parallel_runs)  # alike on every rank: each ends in a gather
    for first in range(0, rounds * parallel_runs, parallel_runs):
        chunk = mine[first:first + parallel_runs]
        finished: dict[int, dict] = {run: {} for run in chunk}
        tasks: dict[int, list[TaskPair]] = {}

        def finish(name: str, run: int, curve: dict) -> None:
            if ranks.world == 1:  # one process: kept at once
                _keep(ws, progress, instances, {name: curve}, run, tasks[run])
            else:  # kept by every rank after the round's gather
                finished[run][name] = curve

        for method in instances:
            todo = [run for run in chunk if run not in progress["curves"].get(method.name, {})]
            for _ in range(len(chunk) - len(todo)):
                overall.skip(method.name)
            for run in todo:
                tasks[run] = tasks.get(run) or run_tasks(ws, run)
            if folds and len(todo) > 1 and runs_side_by_side(method):
                overall.begin_run(method.name, todo[0], len(todo))
                curves = run_method_slots(ws, method, todo, tasks, overall)
                overall.end_run()
                for run, curve in curves.items():
                    finish(method.name, run, curve)
            else:
                for run in todo:
                    overall.begin_run(method.name, run)
                    curve = run_method(ws, method, run, tasks[run], overall)
                    overall.end_run()
                    finish(method.name, run, curve)
        names = {run: [t.name for t in tasks[run]] if run in tasks else None for run in chunk}
        for rank_chunk in ranks.all_gather([(run, finished[run], names[run]) for run in chunk]):
            for rank_run, rank_finished, rank_names in rank_chunk:
                if rank_finished:
                    _keep(ws, progress, instances, rank_finished, rank_run, None, rank_names)
                    if rank_run not in finished:
                        for name in rank_finished:
                            overall.skip(name)
    if not ranks.writer:
        return None
    curves = {name: [progress["curves"][name][run] for run in range(runs)] for name in methods}
    task_names = [progress["task_names"][run] for run in range(runs)]
    results = summarise(ws.config, curves, task_names)
    for method in instances:
        results["methods"][method.name]["info"] = method.info()
        if ws.out_dir is not None:
            method.write_artifacts(ws.out_dir)
    return results


def _keep(ws: Workspace, progress: dict, instances: Sequence[Method], curves: dict, run: int,
          tasks: Optional[Sequence[TaskPair]], names: Optional[list[str]] = None) -> None:
    """Record finished (method, ``run``) curves in ``progress``; rank 0 writes it to the run folder.
    A method's state (e.g. ``ours``' δ samples of run 0) is the one of rank 0, which runs run 0."""
    for name, curve in curves.items():
        progress["curves"].setdefault(name, {})[run] = curve
    progress["task_names"][run] = names if names is not None else [t.name for t in tasks]
    for method in instances:
        progress["methods"][method.name] = method.state_dict()
    if ws.out_dir is not None and ws.ranks.writer:
        _io.torch_save(progress, ws.out_dir / PROGRESS)


def load_progress(ws: Workspace) -> dict:
    """The finished runs of an interrupted meta-test in ``ws.out_dir`` (none without one):
    ``curves[method][run]``, ``task_names[run]`` and each method's ``state_dict()``."""
    path = ws.out_dir / PROGRESS if ws.out_dir is not None else None
    if path is None or not path.exists():
        return {"config": ws.config, "curves": {}, "task_names": {}, "methods": {}}
    fix = "delete it to redo the meta-test"
    progress = _io.torch_load(path, "the meta-test progress", fix)
    if not isinstance(progress, dict) or sorted(progress) != ["config", "curves", "methods", "task_names"] or not all(
            isinstance(v, dict) for v in progress.values()):
        raise UserError(f"{path} is not a meta-test progress file; {fix}")
    changes = computation_changes(progress["config"], ws.config)
    if changes:
        raise UserError(f"{path} holds the meta-test of another configuration ({', '.join(changes[:3])}); {fix}")
    progress["config"] = ws.config
    return progress


def summarise(config: dict, curves: dict[str, list[dict]], task_names: list[list[str]]) -> dict:
    """The ``results.json`` content of the meta-test's curves: per method, kind (readout, original head) and
    task, the mean and std over runs at every eval step (None before the task starts) and every run's
    values."""
    steps = eval_steps(config)
    n_tasks = len(task_names[0])
    out = {"experiment": config["experiment"], "suite": config["suite"],
           "preset": config["preset"], "eval_steps": steps, "task_names": task_names, "methods": {}}
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
