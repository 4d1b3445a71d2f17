"""Datasets (Fashion-MNIST, CIFAR-10/100, Tiny-ImageNet-200, scikit-learn digits), their
documented domain shifts, task splits, and a device-resident batch sampler with on-device
augmentation.

The data root is ``--data-root``, else ``$FASTL2R_DATA``, else ``~/.cache/fastl2r``;
``$FASTL2R_MIRROR`` (a base URL) replaces the official download host for every file.
"""
from .dataset import ImageDataset, channel_stats, resolve_data_root
from .download import FILES, MIRROR_ENV, RemoteFile
from .loaders import BUILT_IN_DATASETS, DATASETS, load_dataset
from .sampler import Batch, TaskSampler, to_float
from .tasks import TRAIN_PARTS, Task, make_task
from .transforms import NO_TRANSFORM, TRANSFORMS, check_transform, transform_dataset

__all__ = [
    "Batch", "BUILT_IN_DATASETS", "DATASETS", "FILES", "ImageDataset", "MIRROR_ENV", "NO_TRANSFORM", "RemoteFile",
    "TRAIN_PARTS", "TRANSFORMS", "Task", "TaskSampler", "channel_stats", "check_transform", "load_dataset",
    "make_task", "resolve_data_root", "to_float", "transform_dataset",
]
