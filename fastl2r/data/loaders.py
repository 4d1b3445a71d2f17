"""Dataset loaders: find or download the official files, parse them, cache the
parsed tensors under the data root.

Layout of the data root (``--data-root``, ``$FASTL2R_DATA`` or ``~/.cache/fastl2r``)::

    fashion-mnist/*.gz          the four idx files (also read from Debian's
                                /usr/share/datasets/fashion-mnist/)
    cifar-10-python.tar.gz      cifar-10-batches-py/     (extracted)
    cifar-100-python.tar.gz     cifar-100-python/        (extracted)
    tiny-imagenet-200.zip       (read in place: 120k small JPEGs are not extracted)
    fashion_mnist.pt  cifar10.pt  cifar100.pt  tiny_imagenet.pt   parsed-tensor caches

A cache records which official files it was built from and is rebuilt when that
changes or when it cannot be read. Digits come from scikit-learn and are not cached.
"""
from __future__ import annotations

import gzip
import io
import math
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._io import torch_save
from ..errors import UserError
from .dataset import ImageDataset, channel_stats, resolve_data_root
from .download import FILES, MIRROR_ENV, extract_tar, fetch

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_CACHE_FORMAT = 1
_OFFLINE_NOTE = "Without internet, `--suite fmnist` runs entirely offline."

Arrays = dict[str, object]  # train/test images and labels (tensors) and class names


def _where_to_get(label: str, file_names: list[str], folder: Path) -> str:
    urls = ", ".join(FILES[n].url for n in file_names)
    return (f"To get {label}: let fastl2r download {urls} (needs internet); or set ${MIRROR_ENV} to a "
            f"base URL serving {', '.join(file_names)}; or copy {'those files' if len(file_names) > 1 else 'it'} "
            f"into {folder} (the data root is set by --data-root or $FASTL2R_DATA).")


def _cached(path: Path, source: str, build: Callable[[], Arrays]) -> Arrays:
    """Load the parsed tensors from ``path`` if they were built from ``source``; else build and save them."""
    if path.is_file():
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # an unreadable cache is simply rebuilt
            data = None
        if isinstance(data, dict) and data.get("format") == _CACHE_FORMAT and data.get("source") == source:
            return data
    data = build()
    data["mean"], data["std"] = channel_stats(data["train_images"])
    data.update(format=_CACHE_FORMAT, source=source)
    torch_save(data, path)
    return data


def _dataset(name: str, data: Arrays, *, flip: bool) -> ImageDataset:
    return ImageDataset(
        name=name,
        train_images=data["train_images"], train_labels=data["train_labels"],
        test_images=data["test_images"], test_labels=data["test_labels"],
        classes=tuple(data["classes"]), mean=tuple(data["mean"]), std=tuple(data["std"]), flip=flip,
    )


# --- Fashion-MNIST -----------------------------------------------------------------------------

def _read_idx(path: Path, ndim: int) -> torch.Tensor:
    """Parse a gzipped idx file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian uint32 dims, data."""
    with gzip.open(path, "rb") as stream:
        raw = bytearray(stream.read())
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes((0, 0, 0x08, ndim)):
        raise UserError(f"{path}: not an idx file of unsigned bytes with {ndim} dimensions "
                        f"(magic {bytes(raw[:4]).hex()}); delete it and run again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) != header + math.prod(dims):
        raise UserError(f"{path}: idx header says {dims} but holds {len(raw) - header} bytes of data")
    return torch.frombuffer(raw, dtype=torch.uint8, offset=header).view(dims)


def _load_fashion_mnist(root: Path, download: bool, progress: bool) -> ImageDataset:
    folder = root / "fashion-mnist"
    names = {split: (f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz")
             for split, prefix in (("train", "train"), ("test", "t10k"))}
    all_names = [n for pair in names.values() for n in pair]
    hint = ("Install Debian's package (`apt-get install dataset-fashion-mnist`, files in "
            f"{DEBIAN_FASHION_MNIST}). " + _where_to_get("Fashion-MNIST", all_names, folder))

    def build() -> Arrays:
        data: Arrays = {"classes": list(FASHION_MNIST_CLASSES)}
        for split, (image_name, label_name) in names.items():
            paths = [fetch(FILES[n], folder, download_missing=download, progress=progress, hint=hint,
                           also_look_in=[DEBIAN_FASHION_MNIST]) for n in (image_name, label_name)]
            images, labels = _read_idx(paths[0], ndim=3), _read_idx(paths[1], ndim=1)
            if images.shape[0] != labels.shape[0] or int(labels.max()) >= len(FASHION_MNIST_CLASSES):
                raise UserError(f"{paths[1]}: labels do not match {paths[0]}")
            data[f"{split}_images"] = F.pad(images.unsqueeze(1), (2, 2, 2, 2)).contiguous()
            data[f"{split}_labels"] = labels.to(torch.int64)
        return data

    source = "fashion-mnist " + " ".join(FILES[n].md5 for n in all_names)
    return _dataset("fashion_mnist", _cached(root / "fashion_mnist.pt", source, build), flip=True)


# --- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------

@dataclass(frozen=True)
class _CifarLayout:
    label: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    labels_key: str
    names_key: str


_CIFAR = {
    "cifar10": _CifarLayout("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                            tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                            "batches.meta", "labels", "label_names"),
    "cifar100": _CifarLayout("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python",
                             ("train",), ("test",), "meta", "fine_labels", "fine_label_names"),
}


def _text(value) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _unpickle(path: Path) -> dict:
    """Load one of CIFAR's Python-2 pickles, with keys as ``str`` whatever pickled them."""
    try:
        with open(path, "rb") as stream:
            obj = pickle.load(stream, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{path}: cannot read this CIFAR file ({exc}); delete {path.parent} and run again") from exc
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR batch (a {type(obj).__name__}, expected a dict)")
    return {_text(k): v for k, v in obj.items()}


def _cifar_split(folder: Path, files: tuple[str, ...], labels_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name in files:
        batch = _unpickle(folder / name)
        try:
            data = np.asarray(batch["data"], dtype=np.uint8)
            images.append(torch.from_numpy(data.reshape(len(data), 3, 32, 32)))
            labels.append(torch.as_tensor(np.asarray(batch[labels_key]), dtype=torch.int64))
        except (KeyError, ValueError) as exc:
            raise UserError(f"{folder / name}: not a CIFAR batch ({exc!r}); delete {folder} and run again") from exc
        if len(labels[-1]) != len(images[-1]):
            raise UserError(f"{folder / name}: {len(images[-1])} images but {len(labels[-1])} labels")
    return torch.cat(images).contiguous(), torch.cat(labels)


def _load_cifar(name: str, root: Path, download: bool, progress: bool) -> ImageDataset:
    layout = _CIFAR[name]
    cache = root / f"{name}.pt"
    hint = (f"(No cache {cache} or extracted {root / layout.folder}/ either.) "
            + _where_to_get(layout.label, [layout.archive], root) + " " + _OFFLINE_NOTE)

    def build() -> Arrays:
        folder = root / layout.folder
        if not folder.is_dir():
            archive = fetch(FILES[layout.archive], root, download_missing=download, progress=progress, hint=hint)
            folder = extract_tar(archive, layout.folder, root)
        train_images, train_labels = _cifar_split(folder, layout.train_files, layout.labels_key)
        test_images, test_labels = _cifar_split(folder, layout.test_files, layout.labels_key)
        meta = _unpickle(folder / layout.meta_file)
        if layout.names_key not in meta:
            raise UserError(f"{folder / layout.meta_file}: has no {layout.names_key!r}; delete {folder} and run again")
        classes = [_text(n) for n in meta[layout.names_key]]
        for labels in (train_labels, test_labels):
            if labels.min() < 0 or labels.max() >= len(classes):
                raise UserError(f"{folder}: labels outside 0..{len(classes) - 1}; delete it and run again")
        return {"train_images": train_images, "train_labels": train_labels,
                "test_images": test_images, "test_labels": test_labels, "classes": classes}

    source = f"{layout.archive} md5 {FILES[layout.archive].md5}"
    return _dataset(name, _cached(cache, source, build), flip=True)


# --- Tiny-ImageNet-200 -------------------------------------------------------------------------

_TINY_TOP = "tiny-imagenet-200/"


def _decode_jpeg(zf: zipfile.ZipFile, member: str) -> np.ndarray:
    """One JPEG as RGB ``[32, 32, 3]``: grayscale is replicated, 64×64 is box-averaged (area) to 32×32."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(zf.read(member))) as img:
            rgb = img.convert("RGB")
    except (KeyError, OSError, UnidentifiedImageError, zlib.error) as exc:
        raise UserError(f"{zf.filename}: cannot decode {member} ({exc}); the archive is damaged") from exc
    if rgb.size != (32, 32):
        rgb = rgb.resize((32, 32), Image.Resampling.BOX)
    return np.asarray(rgb, dtype=np.uint8)


def _decode_all(zf: zipfile.ZipFile, members: list[str], desc: str, progress: bool) -> torch.Tensor:
    out = np.empty((len(members), 32, 32, 3), dtype=np.uint8)
    for i, member in enumerate(tqdm(members, desc=desc, unit="img", disable=not progress, leave=False)):
        out[i] = _decode_jpeg(zf, member)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _read_text(zf: zipfile.ZipFile, member: str) -> str:
    try:
        return zf.read(member).decode("utf-8")
    except KeyError as exc:
        raise UserError(f"{zf.filename}: has no {member}; it is not the official archive") from exc


def _parse_tiny_imagenet(archive: Path, progress: bool) -> Arrays:
    """Train: ``train/<wnid>/images/*.JPEG`` (label = line of ``wnids.txt``, files in name order).
    Test: the labelled ``val`` split, in ``val_annotations.txt`` order. Names: first synonym in ``words.txt``."""
    with zipfile.ZipFile(archive) as zf:
        wnids = _read_text(zf, _TINY_TOP + "wnids.txt").split()
        label_of = {wnid: i for i, wnid in enumerate(wnids)}
        words = dict(line.split("\t", 1) for line in _read_text(zf, _TINY_TOP + "words.txt").splitlines()
                     if "\t" in line)
        classes = [words.get(wnid, wnid).split(",")[0].strip() for wnid in wnids]

        train_members: dict[str, list[str]] = {wnid: [] for wnid in wnids}
        for member in zf.namelist():
            parts = member[len(_TINY_TOP):].split("/")
            if (member.startswith(_TINY_TOP) and len(parts) == 4 and parts[0] == "train"
                    and parts[2] == "images" and parts[1] in train_members and parts[3].upper().endswith(".JPEG")):
                train_members[parts[1]].append(member)
        empty = [wnid for wnid, members in train_members.items() if not members]
        if empty:
            raise UserError(f"{archive}: no training images for {', '.join(empty[:5])}; it is not the official archive")
        train = [(m, label_of[w]) for w in wnids for m in sorted(train_members[w])]

        test = []
        for line in _read_text(zf, _TINY_TOP + "val/val_annotations.txt").splitlines():
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in label_of:
                raise UserError(f"{archive}: bad line in val/val_annotations.txt: {line!r}")
            test.append((f"{_TINY_TOP}val/images/{fields[0]}", label_of[fields[1]]))

        data: Arrays = {"classes": classes}
        for split, items in (("train", train), ("test", test)):
            data[f"{split}_images"] = _decode_all(zf, [m for m, _ in items], f"tiny-imagenet {split}", progress)
            data[f"{split}_labels"] = torch.tensor([label for _, label in items], dtype=torch.int64)
    return data


def _load_tiny_imagenet(root: Path, download: bool, progress: bool) -> ImageDataset:
    name = "tiny-imagenet-200.zip"
    cache = root / "tiny_imagenet.pt"
    hint = f"(No cache {cache} either.) " + _where_to_get("Tiny-ImageNet-200", [name], root) + " " + _OFFLINE_NOTE

    def build() -> Arrays:
        archive = fetch(FILES[name], root, download_missing=download, progress=progress, hint=hint)
        try:
            return _parse_tiny_imagenet(archive, progress)
        except zipfile.BadZipFile as exc:
            raise UserError(f"{archive}: not a readable zip ({exc}); delete it and run again") from exc

    return _dataset("tiny_imagenet", _cached(cache, f"{name} md5 {FILES[name].md5}", build), flip=True)


# --- scikit-learn digits -----------------------------------------------------------------------

DIGITS_TRAIN_FRACTION = (7, 10)


def _load_digits() -> ImageDataset:
    """scikit-learn's 1797 handwritten digits (8×8, values 0..16), as 1×32×32 uint8 images.

    Pixels are scaled to 0..255 and upscaled 8→32 bilinearly (``align_corners=False``,
    no antialias), which keeps strokes smooth rather than blocky; then rounded.
    Split (ours): per class, the first 70% of its images in scikit-learn's order
    (``n * 7 // 10``) are training images, the rest test images. No flip: a
    mirrored digit is a different symbol.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = torch.from_numpy(bunch.images).to(torch.float32).unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    images = big.round().clamp(0, 255).to(torch.uint8).contiguous()
    labels = torch.from_numpy(bunch.target).to(torch.int64)

    num, den = DIGITS_TRAIN_FRACTION
    is_train = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        index = (labels == digit).nonzero().flatten()
        is_train[index[: len(index) * num // den]] = True
    data: Arrays = {"train_images": images[is_train], "train_labels": labels[is_train],
                    "test_images": images[~is_train], "test_labels": labels[~is_train],
                    "classes": [str(d) for d in range(10)]}
    data["mean"], data["std"] = channel_stats(data["train_images"])
    return _dataset("digits", data, flip=False)


# --- entry point -------------------------------------------------------------------------------

# name -> loader(data root, download, progress); ``fastl2r.register_dataset`` adds to it.
DATASETS: dict[str, Callable[[Path, bool, bool], ImageDataset]] = {
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": partial(_load_cifar, "cifar10"),
    "cifar100": partial(_load_cifar, "cifar100"),
    "tiny_imagenet": _load_tiny_imagenet,
    "digits": lambda _root, _download, _progress: _load_digits(),
}
BUILT_IN_DATASETS: tuple[str, ...] = tuple(DATASETS)


def load_dataset(name: str, root=None, *, download: bool = True, progress: bool = True) -> ImageDataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`) from the data root, downloading
    and caching it there on first use (``download=False`` only looks)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)} (or register your own "
                        "with fastl2r.register_dataset)")
    return DATASETS[name](resolve_data_root(root), download, progress)
