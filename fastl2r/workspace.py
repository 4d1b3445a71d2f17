"""What a method or the meta-trainer may ask of an experiment: its configuration, data, tasks,
class draws, networks and cached pre-trained checkpoints — and nothing of the meta-test loop.

``Workspace(config, device=...)`` is cheap: datasets load and checkpoints train on first use,
and every pre-trained network is cached on disk under ``<data root>/checkpoints/``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from . import _io
from .data import (BUILT_IN_DATASETS, NO_TRANSFORM, ImageDataset, Task, load_dataset, make_task, resolve_data_root,
                   transform_dataset)
from .distributed import SINGLE, Ranks
from .errors import UserError
from .models import BUILT_IN_ARCHITECTURES, build_model
from .runlog import RunLog
from .supervised import head_accuracy, steps_for_epochs, train_supervised


def spec_key(obj) -> str:
    """A short, stable hash of the JSON-able ``obj``: the part of a cache file's name that changes with
    whatever shaped the cached network."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


class Workspace:
    """Data, networks and cached checkpoints of one configuration (``experiments.build_config``);
    ``out_dir`` is the run folder (None: nothing is written), ``progress`` whether bars show;
    ``log`` takes the live logs (also to TensorBoard with ``tensorboard``); ``ranks``: this process's
    place in a job of several (``torchrun``), where rank 0 alone writes results and shows progress."""

    def __init__(self, config: dict, *, data_root=None, out_dir=None, device: str | torch.device = "cpu",
                 progress: bool = True, download: bool = True, tensorboard: bool = False, ranks: Ranks = SINGLE):
        self.config = config
        self.device = torch.device(device)
        self.data_root = resolve_data_root(data_root)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.ranks = ranks
        self.progress = progress and ranks.writer
        self.download = download
        self.log = RunLog(self.out_dir, tensorboard and ranks.writer, writer=ranks.writer)
        self._datasets: dict[tuple[str, str], ImageDataset] = {}
        self._states: dict[Path, dict] = {}

    # ----- data -----
    def dataset(self, name: str, transform: str = NO_TRANSFORM) -> ImageDataset:
        """Dataset ``name``, loaded (downloaded if allowed) on first use, then kept for the workspace's life,
        with ``transform`` (``fastl2r.data.TRANSFORMS``) applied to its images."""
        if (name, NO_TRANSFORM) not in self._datasets:
            self._datasets[name, NO_TRANSFORM] = load_dataset(name, self.data_root, download=self.download,
                                                              progress=self.progress)
        if (name, transform) not in self._datasets:
            self._datasets[name, transform] = transform_dataset(self._datasets[name, NO_TRANSFORM], transform)
        return self._datasets[name, transform]

    def task(self, spec: dict, classes: Sequence[int], *, readout: bool = False, seed: int = 0) -> Task:
        """The task of ``spec``'s dataset with ``classes``, its images shifted by the spec's ``transform`` if it
        has one; ``readout`` applies the preset's subset sizes."""
        ro = self.config["readout"]
        dataset = self.dataset(spec["dataset"], spec.get("transform", NO_TRANSFORM))
        return make_task(dataset, tuple(classes), train_part=spec["train_part"],
                         max_train=(ro["max_train"] or None) if readout else None,
                         max_test=(ro["max_test"] or None) if readout else None, seed=seed)

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
        """Task A's spec (``tasks.source``): its dataset and fixed classes."""
        return self.config["tasks"]["source"]

    def source_task(self, *, readout: bool = False, seed: int = 0) -> Task:
        """Task A, which ``w0`` is pre-trained on and every run reads out; ``readout`` and ``seed`` as for
        ``task``."""
        return self.task(self.source_spec, self.source_spec["classes"], readout=readout, seed=seed)

    def run_seed(self, run: int) -> int:
        """The seed of meta-test run ``run`` (its class draws, heads and batches)."""
        return self.config["seed"] * 1000 + run

    # ----- networks and the pre-trained w0 -----
    def new_model(self, head_classes: Sequence[int] = ()) -> nn.Module:
        """A fresh network of the configured architecture for the source dataset's channels, with a head per
        entry of ``head_classes``, on the workspace's device."""
        channels = self.dataset(self.source_spec["dataset"]).channels
        return build_model(self.config["arch"], channels, head_classes).to(self.device)

    @functools.cached_property
    def registered_fingerprint(self) -> dict:
        """What identifies the registered (not built-in) datasets and architecture this configuration
        uses — the datasets' content, the network's parameter shapes — for the checkpoint cache's key;
        a built-in one is identified by its name."""
        c = self.config
        names = {spec["dataset"] for spec in [self.source_spec] + c["tasks"]["meta_train"] + c["tasks"]["meta_test"]}
        found = {name: self.dataset(name).fingerprint() for name in sorted(names) if name not in BUILT_IN_DATASETS}
        if c["arch"] not in BUILT_IN_ARCHITECTURES:
            found["arch"] = spec_key([[n, list(p.shape)] for n, p in self.new_model().named_parameters()])
        return found

    @property
    def cache_dir(self) -> Path:
        """Where pre-trained networks are cached (``<data root>/checkpoints``), for every run that uses this
        data root."""
        return self.data_root / "checkpoints"

    def cached_path(self, kind: str, index: int, extra: Optional[dict] = None) -> Path:
        """Where ``cached_state`` keeps a state.  The key holds everything that shapes it:
        architecture, Task A, pre-training settings, seed, ``index``, ``extra`` and what identifies
        registered datasets and architectures (``registered_fingerprint``)."""
        c = self.config
        fields = {"kind": kind, "arch": c["arch"], "source": self.source_spec, "pretrain": c["pretrain"],
                  "seed": c["seed"], "index": index, "extra": extra}
        if self.registered_fingerprint:
            fields["registered"] = self.registered_fingerprint
        return self.cache_dir / f"{kind}-{c['suite']}-{c['preset']}-seed{c['seed']}-{index}-{spec_key(fields)}.pt"

    def cached_state(self, kind: str, index: int, build: Callable[[], dict], extra: Optional[dict] = None,
                     network: Optional[Callable[[], nn.Module]] = None) -> dict:
        """A network state of ``kind`` (``w0``, a baseline's backbone, ...) from the disk cache
        (``cached_path``), or ``build()`` it and cache it; a JSON file beside it holds the facts.
        A cached file that does not hold a network's weights under ``model`` (of the names and
        shapes of ``network()``, if given) is a UserError."""
        path = self.cached_path(kind, index, extra)
        if path in self._states:
            return self._states[path]
        if path.exists():
            fix = "delete it to rebuild it"
            state = _io.torch_load(path, "the cached network", fix)
            model = state.get("model") if isinstance(state, dict) else None
            if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
                raise UserError(f"the cached network {path} is not a network checkpoint; {fix}")
            mismatch = network is not None and _io.layout_difference(model, network().state_dict(), "model")
            if mismatch:
                raise UserError(f"the cached network {path} does not fit this run's {self.config['arch']} network "
                                f"({mismatch}); {fix}")
        else:
            state = build()
            _io.torch_save(state, path)
            _io.write_json(path.with_suffix(".json"), {k: v for k, v in state.items() if k != "model"})
        self._states[path] = state
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

        return self.cached_state("w0", index, build, network=lambda: self.new_model([self.source_task().num_classes]))

    @property
    def metatest_checkpoint(self) -> int:
        """Which pre-trained checkpoint the meta-test starts from (``metatest.checkpoint``: Experiment 3
        takes one unseen in meta-training)."""
        return self.config["metatest"]["checkpoint"]

    def pretrained_model(self, index: Optional[int] = None) -> nn.Module:
        """A fresh network loaded with ``w0`` (Task A's head included): the meta-test's checkpoint, or
        pre-trained checkpoint ``index``."""
        state = self.pretrained_state(self.metatest_checkpoint if index is None else index)
        model = self.new_model([self.source_task().num_classes])
        model.load_state_dict(state["model"])
        return model

