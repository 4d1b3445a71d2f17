"""Domain shifts of a whole dataset (ours): the ``transform`` key of a task spec.

A transformed dataset holds every image of the original passed through one fixed,
deterministic function, and is normalised with its own training statistics, as every
dataset is.  So an intensity change that is affine (e.g. halving the contrast) would be
normalised away and is not offered; ``invert`` is not: its normalised images are exactly
the negatives of the original's, a shift a ReLU network does not ignore.  Transforms act on
the stored 32×32 images, padding included (an inverted Fashion-MNIST image has a white
border where the original has a black one); augmentation still pads crops with zeros.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError
from .dataset import ImageDataset, channel_stats

NO_TRANSFORM = "none"

TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    NO_TRANSFORM: lambda images: images,
    "invert": lambda images: 255 - images,                                      # x -> 255 - x
    "rot90": lambda images: torch.rot90(images, 1, dims=(2, 3)).contiguous(),   # a quarter turn, counter-clockwise
}


# each transform in words, for ``fastl2r.train EXP --help``
TRANSFORM_WORDS = {NO_TRANSFORM: "", "invert": "inverted (255 − x)", "rot90": "turned a quarter counter-clockwise"}
assert TRANSFORM_WORDS.keys() == TRANSFORMS.keys()


def check_transform(name: str) -> None:
    """A UserError listing the valid transforms unless ``name`` is one (a task spec's ``transform``)."""
    if name not in TRANSFORMS:
        raise UserError(f"unknown transform {name!r}; choose one of: {', '.join(TRANSFORMS)}")


def transform_dataset(dataset: ImageDataset, name: str) -> ImageDataset:
    """``dataset`` with transform ``name`` applied to every train and test image, named
    ``"<dataset>+<name>"``, with its own per-channel statistics; ``"none"`` returns it as is."""
    check_transform(name)
    if name == NO_TRANSFORM:
        return dataset
    function = TRANSFORMS[name]
    train, test = function(dataset.train_images), function(dataset.test_images)
    mean, std = channel_stats(train)
    return ImageDataset(f"{dataset.name}+{name}", train, dataset.train_labels, test, dataset.test_labels,
                        dataset.classes, mean=mean, std=std, flip=dataset.flip)
