"""The in-memory form of every dataset: uint8 images, int64 labels, class names
and the per-channel statistics used to normalise them."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

DATA_ENV = "FASTL2R_DATA"


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A whole dataset as CPU tensors (compared by identity, not by content).

    Images are uint8 ``[N, C, 32, 32]``; ``mean``/``std`` are per-channel over the
    stored training images (padding included) in [0, 1] units.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise ValueError(f"{self.name}: {split}_images must be uint8 [N, C, H, W], got "
                                 f"{images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{self.name}: {split}_labels must be int64 [{images.shape[0]}], got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
        if self.test_images.shape[1:] != self.train_images.shape[1:]:
            raise ValueError(f"{self.name}: train and test images differ in shape")
        if not len(self.mean) == len(self.std) == self.channels:
            raise ValueError(f"{self.name}: mean/std need one value per channel ({self.channels})")

    @property
    def channels(self) -> int:
        """Channels per image (1 for Fashion-MNIST, 3 for CIFAR): what a network's first layer is built for."""
        return self.train_images.shape[1]

    @property
    def num_classes(self) -> int:
        """How many classes the dataset has: valid class ids are ``0 .. num_classes - 1``."""
        return len(self.classes)

    def fingerprint(self) -> str:
        """A hash of the images and labels (what a cached network trained on them depends on)."""
        digest = hashlib.sha1()
        for tensor in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()[:12]

    @classmethod
    def from_datasets(cls, name: str, train, test, *, classes: Optional[Sequence[str]] = None,
                      flip: bool = False) -> "ImageDataset":
        """An ``ImageDataset`` from two ``torch.utils.data.Dataset`` of ``(image [C, H, W], label)`` pairs
        (a ``TensorDataset``, say).  Images are uint8, or floats in [0, 1] stored as uint8 (``round(255·x)``);
        ``classes`` default to the labels' numbers; ``flip``: whether augmentation may mirror them."""
        splits = {}
        for split, data in (("train", train), ("test", test)):
            batches = list(DataLoader(data, batch_size=1024, shuffle=False))
            if not batches or not all(isinstance(b, (list, tuple)) and len(b) == 2 for b in batches):
                raise ValueError(f"{name}: the {split} dataset must hold (image, label) pairs, and at least one")
            images = torch.cat([torch.as_tensor(b[0]) for b in batches])
            if images.is_floating_point():
                if images.min() < 0 or images.max() > 1:
                    raise ValueError(f"{name}: float {split} images must lie in [0, 1] (they are stored as uint8)")
                images = (images * 255).round().to(torch.uint8)
            splits[split] = (images.contiguous(), torch.cat([torch.as_tensor(b[1]) for b in batches]).to(torch.int64))
        labels = torch.cat([splits["train"][1], splits["test"][1]])
        if labels.min() < 0:
            raise ValueError(f"{name}: labels must be 0, 1, ...; found {int(labels.min())}")
        classes = tuple(classes) if classes is not None else tuple(str(c) for c in range(int(labels.max()) + 1))
        if int(labels.max()) >= len(classes):
            raise ValueError(f"{name}: label {int(labels.max())} has no name among the {len(classes)} classes")
        mean, std = channel_stats(splits["train"][0])
        return cls(name, *splits["train"], *splits["test"], classes=classes, mean=mean, std=std, flip=flip)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, train={tuple(self.train_images.shape)}, "
                f"test={tuple(self.test_images.shape)}, classes={self.num_classes}, flip={self.flip})")


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images in [0, 1] units.

    Computed from a 256-bin histogram per channel, so no float copy of the data is made.
    """
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: ``root`` if given, else ``$FASTL2R_DATA``, else ``~/.cache/fastl2r``."""
    if root is None or str(root) == "":
        root = os.environ.get(DATA_ENV) or Path.home() / ".cache" / "fastl2r"
    return Path(root).expanduser().absolute()
