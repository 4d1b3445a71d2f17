"""The in-memory form of every dataset: uint8 images, int64 labels, class names
and the per-channel statistics used to normalise them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
        return self.train_images.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

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
