"""Plug your own architecture, dataset or method into fastl2r by name (DESIGN §7.2).

    import fastl2r
    from fastl2r.models import MultiHeadNet

    fastl2r.register_architecture("small_cnn", lambda in_channels, head_classes:
                                  MultiHeadNet(SmallCNN(in_channels), 32, head_classes))
    fastl2r.register_dataset("blobs", (train, test),   # Datasets of (image [C, H, W], label) pairs
                             split=fastl2r.ClassSplit(source=(0, 1), meta_train=(2, 3), meta_test=(4, 5), ways=1))
    fastl2r.register_method("sgd_momentum", MomentumSGD, options={"lr": 0.1, "momentum": 0.9})

A registered name works wherever a built-in one does: ``build_config("exp1", suite="blobs")``,
``--arch small_cnn`` (or ``--set arch="small_cnn"``), ``--methods ours,sgd_momentum``,
``--set sgd_momentum.lr=0.05``.  On the command line, ``--plugin FILE.py`` (or a module name)
imports a module that registers them.  Built-in names cannot be replaced; registering a name
again replaces what was registered under it.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch.nn as nn

from .data import BUILT_IN_DATASETS, DATASETS, ImageDataset
from .errors import UserError
from .experiments import BUILT_IN_SUITES, TASKS, ClassSplit, suite_from_split
from .methods import BUILT_IN_METHODS, METHOD_OPTIONS, METHODS, Method
from .models import ARCHITECTURES, BUILT_IN_ARCHITECTURES

__all__ = ["ClassSplit", "load_plugin", "register_architecture", "register_dataset", "register_method"]


def _check_name(kind: str, name: str, built_in: Sequence[str]) -> None:
    if not isinstance(name, str) or not name or "," in name:
        raise UserError(f"a {kind} name must be a non-empty string without commas, got {name!r}")
    if name in built_in:
        raise UserError(f"{name!r} is a built-in {kind}; register yours under another name")


def register_architecture(name: str, factory: Callable[[int, Sequence[int]], nn.Module]) -> None:
    """``factory(in_channels, head_classes)`` builds a multi-head network: ``model(x)`` is the
    representation ``[N, D]``, ``model.heads`` its per-task ``Linear`` heads, ``model.add_head(n)``
    adds one (``fastl2r.models.MultiHeadNet`` wraps any backbone so).  Meta-nets gate its Conv2d
    (groups=1), GroupNorm and non-head Linear layers; more than one meta-training slot needs the
    Slot layers of ``fastl2r.models.resnet``."""
    _check_name("architecture", name, BUILT_IN_ARCHITECTURES)
    if not callable(factory):
        raise TypeError(f"register_architecture({name!r}, ...) needs a factory(in_channels, head_classes)")
    ARCHITECTURES[name] = factory


def register_dataset(name: str, data, *, classes: Optional[Sequence[str]] = None, flip: bool = False,
                     split: Optional[ClassSplit] = None, arch: Optional[str] = None) -> None:
    """``data``: an ``ImageDataset``, a ``(train, test)`` pair of ``torch.utils.data.Dataset`` of
    ``(image [C, H, W], label)`` pairs (``ImageDataset.from_datasets``: uint8 images, or floats in
    [0, 1]; ``classes`` names the labels, ``flip`` allows mirrored augmentation), or a function of no
    argument returning either, called when the dataset is first used.  With ``split``, a suite of
    the same name runs the experiments that one dataset supports (``suite_from_split``), on
    ``arch`` if given."""
    _check_name("dataset", name, BUILT_IN_DATASETS)
    if split is not None:
        _check_name("suite", name, BUILT_IN_SUITES)

    def load(_root: Path, _download: bool, _progress: bool) -> ImageDataset:
        value = data() if callable(data) else data
        try:
            if isinstance(value, ImageDataset):
                return dataclasses.replace(value, name=name)
            train, test = value
            return ImageDataset.from_datasets(name, train, test, classes=classes, flip=flip)
        except (TypeError, ValueError) as exc:
            raise UserError(f"dataset {name!r}: {exc}") from None

    DATASETS[name] = load
    if split is not None:
        TASKS[name] = suite_from_split(name, split, arch)


def register_method(name: str, cls: type[Method], options: Optional[dict] = None) -> None:
    """``cls``, a ``fastl2r.methods.Method`` subclass, runs as method ``name``; ``options`` (plain
    JSON values) become its ``config["methods"][name]``, the ``options`` it is built with."""
    _check_name("method", name, BUILT_IN_METHODS)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"register_method({name!r}, ...) needs a subclass of fastl2r.methods.Method")
    if getattr(cls, "name", name) != name:
        raise UserError(f"register_method({name!r}, {cls.__name__}): the class is named {cls.name!r}")
    cls.name = name
    METHODS[name] = cls
    METHOD_OPTIONS[name] = dict(options or {})


def load_plugin(spec: str) -> ModuleType:
    """Import a module that registers architectures, datasets or methods: a ``.py`` file's path
    or an importable module's name."""
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        if not path.is_file():
            raise UserError(f"--plugin {spec}: no such file")
        module_name = f"fastl2r_plugin_{path.stem}"
        if getattr(sys.modules.get(module_name), "__file__", None) == str(path):
            return sys.modules[module_name]  # loaded already (a resumed run's plugins are recorded)
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module  # classes defined in it (dataclasses, pickling) look it up here
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise UserError(f"--plugin {spec}: {exc}; pass a .py file or an importable module") from None
