"""The files datasets come from: one table of addresses, sizes and md5s, and a
verifying downloader.

Every file is checked (size, then md5) before it is used, whether it was just
downloaded or was already on disk. A download goes to a temporary file next to
its destination and is renamed into place only when both checks pass, so a
failed, truncated or corrupt download leaves nothing behind.

``FASTL2R_MIRROR``: a base URL that replaces the official host for every file,
e.g. ``FASTL2R_MIRROR=http://fileserver.lan/datasets`` fetches
``http://fileserver.lan/datasets/cifar-10-python.tar.gz``. All files sit flat
under that one URL, named as in :data:`FILES`. Use it on machines without
internet that can reach a local copy.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from torch.hub import download_url_to_file

from .._io import atomic_path
from ..errors import UserError

MIRROR_ENV = "FASTL2R_MIRROR"
_CHUNK = 1 << 20
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


@dataclass(frozen=True)
class RemoteFile:
    """One file a dataset is built from, and what its verified content must be.

    ``size`` and ``md5`` describe the file itself, or, with ``gzip_content``, its
    decompressed content (Debian recompresses Fashion-MNIST's ``.gz`` files, so
    only the content is stable).
    """

    name: str
    url: str
    size: int
    md5: str
    gzip_content: bool = False

    @property
    def source_url(self) -> str:
        """Where to download from: the official URL, or the same name under ``$FASTL2R_MIRROR``."""
        mirror = mirror_base()
        return f"{mirror}/{self.name}" if mirror else self.url


def mirror_base() -> str | None:
    """``$FASTL2R_MIRROR`` without a trailing slash, or None when unset."""
    return os.environ.get(MIRROR_ENV, "").strip().rstrip("/") or None


FILES: dict[str, RemoteFile] = {
    f.name: f
    for f in (
        RemoteFile("train-images-idx3-ubyte.gz", _FMNIST_URL + "train-images-idx3-ubyte.gz",
                   47040016, "f4a8712d7a061bf5bd6d2ca38dc4d50a", gzip_content=True),
        RemoteFile("train-labels-idx1-ubyte.gz", _FMNIST_URL + "train-labels-idx1-ubyte.gz",
                   60008, "9018921c3c673c538a1fc5bad174d6f9", gzip_content=True),
        RemoteFile("t10k-images-idx3-ubyte.gz", _FMNIST_URL + "t10k-images-idx3-ubyte.gz",
                   7840016, "8181f5470baa50b63fa0f6fddb340f0a", gzip_content=True),
        RemoteFile("t10k-labels-idx1-ubyte.gz", _FMNIST_URL + "t10k-labels-idx1-ubyte.gz",
                   10008, "15d484375f8d13e6eb1aabb0c3f46965", gzip_content=True),
        RemoteFile("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                   170498071, "c58f30108f718f92721af3b95e74349a"),
        RemoteFile("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                   169001437, "eb9058c3a382ffc7106e4002c42a8d85"),
        RemoteFile("tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
                   248100043, "90528d7ca1a48142e341f4ef8d21d0de"),
    )
}


def _size_and_md5(stream) -> tuple[int, str]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def verify(path: Path, remote: RemoteFile, *, origin: str | None = None) -> None:
    """Raise :class:`UserError` unless ``path`` has ``remote``'s size and md5.

    ``origin`` (the URL a fresh download came from) changes the advice: a bad
    download was discarded; a bad file already on disk is the user's to replace.
    """
    what = "decompressed content" if remote.gzip_content else "file"
    if origin is None:
        fix = f"delete or replace it (it is not used), then run again to fetch {remote.source_url}"
        where = str(path)
    else:
        fix = "the download was discarded; " + (
            f"check that ${MIRROR_ENV} serves the official file" if mirror_base() else "run again to retry")
        where = f"{remote.name} downloaded from {origin}"
    md5 = None
    try:
        if remote.gzip_content:
            with gzip.open(path, "rb") as stream:
                size, md5 = _size_and_md5(stream)
        else:
            size = path.stat().st_size
            if size == remote.size:
                with open(path, "rb") as stream:
                    _, md5 = _size_and_md5(stream)
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{where}: cannot read it ({exc}); {fix}") from exc
    if size != remote.size:
        raise UserError(
            f"{where}: {what} is {size} bytes, expected {remote.size} (truncated or not the "
            f"official file); {fix}"
        )
    if md5 != remote.md5:
        raise UserError(f"{where}: {what} has md5 {md5}, expected {remote.md5} (corrupt); {fix}")


def download(remote: RemoteFile, path: Path, *, progress: bool = True, hint: str = "") -> None:
    """Download ``remote`` to ``path`` with a progress bar; keep it only if it verifies."""
    url = remote.source_url
    with atomic_path(path) as tmp:
        try:
            download_url_to_file(url, str(tmp), progress=progress)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise UserError(f"could not download {url}: {exc}. {hint}".rstrip()) from exc
        verify(tmp, remote, origin=url)


def fetch(
    remote: RemoteFile,
    folder: Path,
    *,
    download_missing: bool,
    progress: bool,
    hint: str,
    also_look_in: Iterable[Path] = (),
) -> Path:
    """Return a verified copy of ``remote``: ``folder/<name>``, else one in
    ``also_look_in``, else a fresh download into ``folder`` (if allowed).

    A copy that is present but wrong is reported, never silently skipped.
    """
    candidates = [folder / remote.name, *(Path(d) / remote.name for d in also_look_in)]
    for path in candidates:
        if path.is_file():
            verify(path, remote)
            return path
    if not download_missing:
        looked = ", ".join(str(p) for p in candidates)
        raise UserError(f"{remote.name} not found (looked at {looked}) and downloading is off. {hint}".rstrip())
    download(remote, candidates[0], progress=progress, hint=hint)
    return candidates[0]


def extract_tar(archive: Path, member_dir: str, dest_root: Path) -> Path:
    """Extract ``archive`` and move its top folder ``member_dir`` to ``dest_root/member_dir``.

    Extraction happens in a temporary folder that is renamed into place only
    once complete; on any failure the temporary folder is removed.
    """
    target = dest_root / member_dir
    tmp = Path(tempfile.mkdtemp(prefix=f".{member_dir}.", suffix=".tmp", dir=dest_root))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{archive}: cannot extract it ({exc}); delete it and run again") from exc
        if not (tmp / member_dir).is_dir():
            raise UserError(f"{archive}: has no top folder {member_dir}/; it is not the official archive")
        try:
            os.replace(tmp / member_dir, target)
        except OSError:
            if not target.is_dir():  # else another process finished the same extraction first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
