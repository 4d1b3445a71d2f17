"""Tiny dataset archives in the official formats, and a local HTTP server for them.

The archives follow the official layouts (folder names, pickle keys, zip tree)
so that the library's real download, verification and parsing code runs on
them. Pixel values follow simple formulas, so tests check the parsed tensors
against the formulas, not against a second parse.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from fastl2r.data import FILES, RemoteFile


def cifar_pixel(i: int, c: int, y: int, x: int) -> int:
    """Value of pixel (c, y, x) of the i-th image of a split in the tiny CIFAR archives."""
    return (7 * i + 50 * c + 3 * y + x) % 256


def _cifar_images(first: int, count: int) -> np.ndarray:
    """Rows of 3072 bytes as in CIFAR's ``data``: the R, G, B planes, each 32×32 row-major."""
    i, c, y, x = np.meshgrid(np.arange(first, first + count), np.arange(3), np.arange(32), np.arange(32),
                             indexing="ij")
    return ((7 * i + 50 * c + 3 * y + x) % 256).astype(np.uint8).reshape(count, 3072)


def _pickle(obj, path: Path) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _tar_folder(folder: Path, archive: Path) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)


@dataclass
class TinyCifar:
    archive: Path
    train_labels: list[int]
    test_labels: list[int]
    classes: list[str]


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def build_cifar10(workdir: Path, per_batch: int = 3, test_count: int = 7) -> TinyCifar:
    """``cifar-10-python.tar.gz`` with ``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
    ``batches.meta``. Keys and names are bytes, as Python 2's pickles read with ``encoding="bytes"``."""
    folder = workdir / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_labels = [(3 * i + 1) % 10 for i in range(5 * per_batch)]
    for b in range(5):
        span = range(b * per_batch, (b + 1) * per_batch)
        _pickle({b"batch_label": f"training batch {b + 1} of 5".encode(),
                 b"labels": [train_labels[i] for i in span],
                 b"data": _cifar_images(span.start, per_batch),
                 b"filenames": [f"img_{i}.png".encode() for i in span]}, folder / f"data_batch_{b + 1}")
    test_labels = [(7 * j) % 10 for j in range(test_count)]
    _pickle({b"batch_label": b"testing batch 1 of 1", b"labels": test_labels,
             b"data": _cifar_images(0, test_count), b"filenames": [b"t.png"] * test_count}, folder / "test_batch")
    _pickle({b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": per_batch,
             b"num_vis": 3072}, folder / "batches.meta")
    (folder / "readme.html").write_text("<html>tiny CIFAR-10 for tests</html>")
    archive = workdir / "cifar-10-python.tar.gz"
    _tar_folder(folder, archive)
    return TinyCifar(archive, train_labels, test_labels, CIFAR10_NAMES)


def build_cifar100(workdir: Path, train_count: int = 11, test_count: int = 5) -> TinyCifar:
    """``cifar-100-python.tar.gz`` with ``cifar-100-python/train``, ``test``, ``meta`` (``str`` keys)."""
    folder = workdir / "cifar-100-python"
    folder.mkdir(parents=True)
    fine_names = [f"fine_{k:02d}" for k in range(100)]
    train_labels = [(37 * i + 5) % 100 for i in range(train_count)]
    test_labels = [(11 * j + 90) % 100 for j in range(test_count)]
    for split, labels in (("train", train_labels), ("test", test_labels)):
        _pickle({"filenames": [f"{split}_{i}.png" for i in range(len(labels))], "batch_label": split,
                 "fine_labels": labels, "coarse_labels": [label // 5 for label in labels],
                 "data": _cifar_images(0, len(labels))}, folder / split)
    _pickle({"fine_label_names": fine_names, "coarse_label_names": [f"coarse_{k}" for k in range(20)]},
            folder / "meta")
    archive = workdir / "cifar-100-python.tar.gz"
    _tar_folder(folder, archive)
    return TinyCifar(archive, train_labels, test_labels, fine_names)


@dataclass
class TinyImagenet:
    archive: Path
    wnids: list[str]
    names: list[str]
    train_colors: list[tuple[int, int, int] | None]   # per training image in expected order; None = special
    train_labels: list[int]
    test_colors: list[tuple[int, int, int]]
    test_labels: list[int]
    gray_index: int          # training image stored as a grayscale JPEG of value GRAY
    half_index: int          # training image: left half white, right half black


GRAY = 200


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=95)
    return out.getvalue()


def build_tiny_imagenet(workdir: Path) -> TinyImagenet:
    """``tiny-imagenet-200.zip`` with the official tree (3 classes × 3 training images,
    4 labelled val images, 1 unlabelled test image), all 64×64 JPEGs."""
    top = "tiny-imagenet-200/"
    wnids = ["n02085620", "n01443537", "n01629819"]     # wnids.txt is not sorted
    words = {"n00001740": "entity", "n01443537": "goldfish, Carassius auratus",
             "n01629819": "European fire salamander, Salamandra salamandra", "n02085620": "Chihuahua"}
    palette = [[(200, 30, 90), (20, 180, 60), (240, 240, 10)],
               [(10, 10, 200), None, (128, 64, 32)],
               [None, (90, 200, 200), (250, 120, 0)]]
    gray_index, half_index = 4, 6                       # class 1 image 1; class 2 image 0
    entries: dict[str, bytes] = {top: b"", top + "train/": b"", top + "val/": b"", top + "test/": b""}
    entries[top + "wnids.txt"] = "".join(w + "\n" for w in wnids).encode()
    entries[top + "words.txt"] = "".join(f"{k}\t{v}\n" for k, v in sorted(words.items())).encode()
    train_colors, train_labels = [], []
    for label, wnid in enumerate(wnids):
        entries[f"{top}train/{wnid}/"] = b""
        entries[f"{top}train/{wnid}/{wnid}_boxes.txt"] = "".join(
            f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(3)).encode()
        for i, color in enumerate(palette[label]):
            index = len(train_labels)
            if index == gray_index:
                image = Image.new("L", (64, 64), GRAY)
            elif index == half_index:
                pixels = np.zeros((64, 64, 3), dtype=np.uint8)
                pixels[:, :32] = 255
                image = Image.fromarray(pixels)
            else:
                image = Image.new("RGB", (64, 64), color)
            entries[f"{top}train/{wnid}/images/{wnid}_{i}.JPEG"] = _jpeg(image)
            train_colors.append(color)
            train_labels.append(label)
    test_colors = [(255, 0, 0), (0, 0, 255), (60, 60, 60), (0, 255, 0)]
    test_labels = [2, 0, 1, 2]
    annotations = []
    for j, (color, label) in enumerate(zip(test_colors, test_labels)):
        entries[f"{top}val/images/val_{j}.JPEG"] = _jpeg(Image.new("RGB", (64, 64), color))
        annotations.append(f"val_{j}.JPEG\t{wnids[label]}\t0\t0\t63\t63\n")
    entries[top + "val/val_annotations.txt"] = "".join(annotations).encode()
    entries[top + "test/images/test_0.JPEG"] = _jpeg(Image.new("RGB", (64, 64), (1, 2, 3)))
    workdir.mkdir(parents=True, exist_ok=True)
    archive = workdir / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    names = ["Chihuahua", "goldfish", "European fire salamander"]
    return TinyImagenet(archive, wnids, names, train_colors, train_labels, test_colors, test_labels,
                        gray_index, half_index)


def idx_gz(path: Path, array: np.ndarray) -> bytes:
    """Write ``array`` (uint8) as a gzipped idx file; return the uncompressed content."""
    content = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(content))
    return content


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def remote_matching(path: Path, *, content: bytes | None = None) -> RemoteFile:
    """The table entry for ``path``'s name, with the size and md5 of the tiny file (or of its ``content``)."""
    data = path.read_bytes() if content is None else content
    return replace(FILES[path.name], size=len(data), md5=md5_of(data))


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's folder; paths under ``/cut/`` promise the whole file but send half of it."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path.startswith("/cut/"):
            data = (Path(self.directory) / self.path[len("/cut/"):]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@dataclass
class LocalServer:
    url: str
    requests: list[str]


@contextmanager
def serve(directory: Path) -> Iterator[LocalServer]:
    """Serve ``directory`` over HTTP on 127.0.0.1 (ephemeral port) from a background thread."""

    def handler(*args, **kwargs):
        return _Handler(*args, directory=str(directory), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield LocalServer(f"http://127.0.0.1:{server.server_address[1]}", server.requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
