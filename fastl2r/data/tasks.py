"""Tasks: a set of a dataset's classes, relabelled 0..k-1, with the images they use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import UserError
from .dataset import ImageDataset

TRAIN_PARTS = ("all", "first_half", "second_half")
_PART_SUFFIX = {"all": "", "first_half": "(first half)", "second_half": "(second half)"}


@dataclass(frozen=True, eq=False)
class Task:
    """Some classes of ``dataset``; the task label of a class is its position in ``classes``.

    ``train_index``/``test_index`` index the dataset's train/test images, in dataset order.
    """

    name: str
    dataset: ImageDataset
    classes: tuple[int, ...]
    train_index: torch.Tensor
    test_index: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Classes in the task: the width of its head."""
        return len(self.classes)

    def _local_labels(self, labels: torch.Tensor) -> torch.Tensor:
        lookup = torch.full((self.dataset.num_classes,), -1, dtype=torch.int64)
        lookup[list(self.classes)] = torch.arange(self.num_classes)
        return lookup[labels]

    def train_images(self) -> torch.Tensor:
        """The task's training images, uint8 ``[N, C, H, W]``, in dataset order."""
        return self.dataset.train_images[self.train_index]

    def train_labels(self) -> torch.Tensor:
        """The task-local labels (0 .. k-1) of ``train_images()``: what the task's head is trained on."""
        return self._local_labels(self.dataset.train_labels[self.train_index])

    def test_images(self) -> torch.Tensor:
        """The task's test images, uint8 ``[N, C, H, W]``, in dataset order."""
        return self.dataset.test_images[self.test_index]

    def test_labels(self) -> torch.Tensor:
        """The task-local labels of ``test_images()``."""
        return self._local_labels(self.dataset.test_labels[self.test_index])

    def __repr__(self) -> str:
        return f"Task({self.name!r}, train={len(self.train_index)}, test={len(self.test_index)})"


def _proportional_quotas(sizes: list[int], limit: int) -> list[int]:
    """Split ``limit`` over classes in proportion to ``sizes`` (largest remainder; ties to earlier classes)."""
    total = sum(sizes)
    quotas = [limit * n // total for n in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(limit * sizes[i] % total), i))
    for i in by_remainder[: limit - sum(quotas)]:
        quotas[i] += 1
    return quotas


def _subsample(per_class: list[torch.Tensor], limit: int | None, classes: tuple[int, ...],
               seed: int, split: int) -> list[torch.Tensor]:
    """A class-stratified subset of at most ``limit`` images.

    Each class keeps a prefix of its own permutation, seeded by (seed, class, split),
    so a class's subset does not depend on the other classes in the task and a
    smaller limit gives a subset of a larger one.
    """
    sizes = [len(index) for index in per_class]
    if limit is None or limit >= sum(sizes):
        return per_class
    chosen = []
    for index, class_id, quota in zip(per_class, classes, _proportional_quotas(sizes, limit), strict=True):
        generator = torch.Generator().manual_seed((seed * 1_000_003 + class_id * 2 + split) % 2**63)
        keep = torch.randperm(len(index), generator=generator)[:quota]
        chosen.append(index[keep].sort().values)
    return chosen


def make_task(dataset: ImageDataset, classes: Iterable[int], *, train_part: str = "all",
              max_train: int | None = None, max_test: int | None = None, seed: int = 0) -> Task:
    """The task of ``classes`` (original ids, in task-label order) of ``dataset``.

    ``train_part``: ``"all"`` training images, or per class the ``"first_half"`` /
    ``"second_half"`` of that class's training images in dataset order (the second
    half gets the odd one). Experiment 1 meta-trains on one half and meta-tests on
    the other. ``max_train``/``max_test``: a fixed, seeded, class-stratified subset
    of that many images (reduced presets). Test images are never split in halves.
    """
    try:
        class_ids = tuple(int(c) for c in classes)
    except (TypeError, ValueError) as exc:
        raise UserError(f"task classes must be integer class ids, got {classes!r}") from exc
    valid = f"0..{dataset.num_classes - 1}"
    if not class_ids:
        raise UserError(f"a task of {dataset.name} needs at least one class ({valid})")
    unknown = [c for c in class_ids if not 0 <= c < dataset.num_classes]
    if unknown:
        raise UserError(f"{dataset.name} has no class {unknown}; valid class ids are {valid}")
    if len(set(class_ids)) != len(class_ids):
        raise UserError(f"task classes {list(class_ids)} repeat a class; list each class once")
    if train_part not in TRAIN_PARTS:
        raise UserError(f"train_part {train_part!r} is not one of {', '.join(TRAIN_PARTS)}")
    for label, limit in (("max_train", max_train), ("max_test", max_test)):
        if limit is not None and limit < len(class_ids):
            raise UserError(f"{label}={limit} leaves some of the {len(class_ids)} classes without images; "
                            f"use at least {len(class_ids)} or None (all)")

    train_parts = []
    for c in class_ids:
        index = (dataset.train_labels == c).nonzero().flatten()
        half = len(index) // 2
        train_parts.append({"all": index, "first_half": index[:half], "second_half": index[half:]}[train_part])
    test_parts = [(dataset.test_labels == c).nonzero().flatten() for c in class_ids]
    train_parts = _subsample(train_parts, max_train, class_ids, seed, split=0)
    test_parts = _subsample(test_parts, max_test, class_ids, seed, split=1)

    for split, parts in (("training", train_parts), ("test", test_parts)):
        empty = [c for c, index in zip(class_ids, parts, strict=True) if len(index) == 0]
        if empty:
            raise UserError(f"{dataset.name} classes {empty} have no {split} images"
                            f"{'' if train_part == 'all' or split == 'test' else ' in the ' + train_part}; "
                            "choose other classes")

    name = f"{dataset.name}[{','.join(map(str, class_ids))}]{_PART_SUFFIX[train_part]}"
    return Task(name=name, dataset=dataset, classes=class_ids,
                train_index=torch.cat(train_parts).sort().values,
                test_index=torch.cat(test_parts).sort().values)
