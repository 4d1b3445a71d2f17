"""Device-resident batches: images stay uint8 on the device; only the batch is
augmented (whole batch at once, tensor ops) and converted to normalised float.

Randomness is *keyed*: every random number is a hash of (key, counter, stream, element),
computed on the device.  A batch is therefore a pure function of its key and counter —
an episode's data depends on its seed and step alone, not on which slot, process or
order runs it — and drawing it needs no generator state and no host read, so S slots
draw their batches in one call (DESIGN §6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import UserError
from .dataset import ImageDataset
from .tasks import Task

CROP_PADDING = 4
_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B  # an odd multiplier below 2^31: products of 32-bit values stay inside int64


@dataclass
class Batch:
    """``x`` float32 ``[B, C, H, W]`` normalised; ``y`` task-local labels; ``task`` index into the sampler's tasks.
    A batch of S slots has a leading slot axis: ``x [S, B, C, H, W]``, ``y`` and ``task`` ``[S, B]``."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images.to(torch.float32) / 255.0 - mean) / std


def to_float(images: torch.Tensor,
             stats: ImageDataset | tuple[Sequence[float], Sequence[float]]) -> torch.Tensor:
    """Normalise uint8 images ``[..., C, H, W]`` with a dataset's (or an explicit ``(mean, std)``)
    per-channel statistics, without augmentation (readout, evaluation)."""
    mean, std = (stats.mean, stats.std) if isinstance(stats, ImageDataset) else stats
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    if images.dim() < 3 or images.shape[-3] != len(mean):
        raise ValueError(f"images {tuple(images.shape)} do not have {len(mean)} channels at dim -3")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
    return _normalise(images, mean_t, std_t)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xor-shift-multiply) of int64 tensors holding values below 2^32."""
    x = ((x ^ (x >> 16)) * _MIX) & _MASK32
    x = ((x ^ (x >> 16)) * _MIX) & _MASK32
    return x ^ (x >> 16)


def keyed_uniform(key: torch.Tensor, counter: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """``[S, n]`` float32 uniforms in [0, 1), a function of (key[s], counter[s], stream, j) only."""
    state = _hash32(_hash32(key & _MASK32) ^ (counter & _MASK32))
    state = _hash32(state[:, None] ^ _element_hashes(stream, n, key.device)[None, :])
    return (state >> 8).to(torch.float32) * (1.0 / (1 << 24))


_element_cache: dict[tuple, torch.Tensor] = {}


def _element_hashes(stream: int, n: int, device: torch.device) -> torch.Tensor:
    """The hashed element indices of a stream: constants, built once per (stream, n, device)."""
    cache_key = (stream, n, device)
    if cache_key not in _element_cache:
        element = torch.arange(n, dtype=torch.int64, device=device) + stream * (1 << 24)
        _element_cache[cache_key] = _hash32(element & _MASK32)
    return _element_cache[cache_key]


@dataclass(frozen=True)
class SamplingSet:
    """Which classes a slot draws from: per entry a row of the sampler's class table, the task
    index and the task-local label its images get.  ``[..., M]`` tensors; padded entries
    point at the empty row 0."""

    rows: torch.Tensor
    task: torch.Tensor
    label: torch.Tensor


class SlotSampler:
    """Batches for S slots at once, each drawn from its own ``SamplingSet`` of the classes
    registered here.

    Each image of a slot's batch is drawn independently and uniformly from the union of
    its set's training images (so a class's share follows its size). Augmentation
    (DESIGN §1.2): a random 32×32 crop of the image zero-padded by 4 pixels per side, and
    a horizontal flip with p=0.5 for datasets where ``flip`` holds.
    """

    def __init__(self, tasks: Sequence[Task], batch_size: int, *, device, augment: bool = True):
        if not tasks:
            raise UserError("a sampler needs at least one task")
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        shapes = {tuple(t.dataset.train_images.shape[1:]) for t in tasks}
        if len(shapes) > 1:
            raise UserError("tasks in one sampler need images of one shape (channels, height, width); got "
                            + ", ".join(f"{t.name} {tuple(t.dataset.train_images.shape[1:])}" for t in tasks))
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.augment = augment
        self._row_of: dict[tuple[str, int], int] = {}
        images, starts, counts, means, stds, flips = [], [0], [0], [], [], []
        channels = next(iter(shapes))[0]
        means.append([0.0] * channels)  # row 0: the empty class of padded entries
        stds.append([1.0] * channels)
        flips.append(False)
        for task in tasks:
            labels = task.dataset.train_labels[task.train_index]
            for class_id in task.classes:
                index = task.train_index[labels == class_id]
                key = (task.dataset.name, class_id)
                if key in self._row_of:
                    if counts[self._row_of[key]] != len(index):
                        raise UserError(f"class {class_id} of {task.dataset.name} appears with two different "
                                        "image sets in one sampler")
                    continue
                self._row_of[key] = len(counts)
                images.append(task.dataset.train_images[index])
                starts.append(starts[-1] + counts[-1])
                counts.append(len(index))
                means.append(list(task.dataset.mean))
                stds.append(list(task.dataset.std))
                flips.append(task.dataset.flip)
        self.images = torch.cat(images).to(self.device)
        self._start = torch.tensor(starts, dtype=torch.int64, device=self.device)
        self._count = torch.tensor(counts, dtype=torch.int64, device=self.device)
        self._mean = torch.tensor(means, dtype=torch.float32, device=self.device)
        self._std = torch.tensor(stds, dtype=torch.float32, device=self.device)
        self._flip = torch.tensor(flips, device=self.device)

    def sampling_set(self, tasks: Sequence[Task], width: int | None = None, first_task: int = 0) -> SamplingSet:
        """The set of ``tasks`` (task ``i`` gets index ``first_task + i``), padded to ``width`` entries."""
        rows, task_ids, labels = [], [], []
        for i, task in enumerate(tasks):
            for label, class_id in enumerate(task.classes):
                key = (task.dataset.name, class_id)
                if key not in self._row_of:
                    raise ValueError(f"class {class_id} of {task.dataset.name} was not given to this sampler")
                rows.append(self._row_of[key])
                task_ids.append(first_task + i)
                labels.append(label)
        width = len(rows) if width is None else width
        if width < len(rows):
            raise ValueError(f"{len(rows)} classes do not fit a sampling set of {width} entries")
        pad = width - len(rows)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values + [0] * pad, dtype=torch.int64, device=self.device)

        return SamplingSet(tensor(rows), tensor(task_ids), tensor(labels))

    def sample(self, sets: SamplingSet, key: torch.Tensor, counter: torch.Tensor, stream: int = 0) -> Batch:
        """One batch per slot: ``sets`` ``[S, M]``, ``key`` and ``counter`` ``[S]`` int64 (the same
        key, counter and stream give the same batch)."""
        n = self.batch_size
        draws = keyed_uniform(key, counter, stream, 4 * n)                 # position, dy, dx, flip
        counts = self._count[sets.rows]                                    # [S, M]
        ends = counts.cumsum(1)
        position = (draws[:, :n] * ends[:, -1:]).long()
        position = torch.minimum(position, ends[:, -1:] - 1)               # float rounding at the top end
        entry = torch.searchsorted(ends, position, right=True)            # [S, B]
        row = sets.rows.gather(1, entry)
        within = position - (ends.gather(1, entry) - counts.gather(1, entry))
        images = self.images[self._start[row] + within]                   # [S, B, C, H, W]
        if self.augment:
            images = self._crop_and_flip(images, row, draws[:, n:])
        x = _normalise(images, self._mean[row][..., None, None], self._std[row][..., None, None])
        return Batch(x=x, y=sets.label.gather(1, entry), task=sets.task.gather(1, entry))

    def _crop_and_flip(self, images: torch.Tensor, row: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """``out[s, b, c, i, j] = padded[s, b, c, dy + i, dx + (W-1-j if flipped else j)]`` for every image
        at once; ``draws [S, 3B]``: the uniforms of dy, dx and the flip."""
        slots, n, channels, height, width = images.shape
        padded = F.pad(images.flatten(0, 1), (CROP_PADDING,) * 4)
        shift = (draws[:, :2 * n] * (2 * CROP_PADDING + 1)).long()
        dy, dx = shift[:, :n].reshape(-1, 1), shift[:, n:].reshape(-1, 1)
        flipped = ((draws[:, 2 * n:] < 0.5) & self._flip[row]).reshape(-1, 1)
        cols = torch.arange(width, device=self.device)
        rows = dy + torch.arange(height, device=self.device)
        cols = dx + torch.where(flipped, width - 1 - cols, cols)
        batch = torch.arange(slots * n, device=self.device)[:, None, None, None]
        channel = torch.arange(channels, device=self.device)[None, :, None, None]
        out = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
        return out.view(slots, n, channels, height, width)


class TaskSampler:
    """Batches drawn from the union of ``tasks`` (one slot of ``SlotSampler``): batch k is a
    function of ``(seed, k)``, so a seed fixes the sequence of batches."""

    def __init__(self, tasks: Sequence[Task], batch_size: int, *, device, seed: int, augment: bool = True):
        self.tasks = tuple(tasks)
        self._sampler = SlotSampler(self.tasks, batch_size, device=device, augment=augment)
        self._set = SamplingSet(*(t[None] for t in vars(self._sampler.sampling_set(self.tasks)).values()))
        self._key = torch.tensor([seed], dtype=torch.int64, device=self._sampler.device)
        self._counter = torch.zeros(1, dtype=torch.int64, device=self._sampler.device)

    @property
    def batch_size(self) -> int:
        """Images per batch, as the sampler was built."""
        return self._sampler.batch_size

    def sample(self) -> Batch:
        """The next batch, ``x [B, C, H, W]`` augmented: the k-th call gives batch k of the seed's sequence."""
        batch = self._sampler.sample(self._set, self._key, self._counter)
        self._counter += 1
        return Batch(batch.x[0], batch.y[0], batch.task[0])
