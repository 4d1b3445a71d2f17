"""Atomic file writes: a result, cache or checkpoint is either complete or absent.

A write goes to ``.<name>.<pid>.<random>.tmp`` beside its target and is renamed into place
when complete; a process killed mid-write leaves that file behind, and the writer's PID in
its name tells ``remove_stale_tmp`` that it is safe to delete.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .errors import UserError, WriteError, first_line

_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it into place only on success.  Any
    ``OSError`` on the way (a full disk, a read-only folder) becomes a ``WriteError`` naming
    ``path``; the temporary file is removed."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
    except OSError as exc:
        raise WriteError(path, exc.strerror or str(exc)) from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (``atomic_path``): a reader, or a run killed mid-write, finds the
    old file or the whole new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as ``write_bytes``."""
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON, atomically: the form of ``config.json``, ``results.json``
    and the caches' facts."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically; a failed write (a full disk) is a ``WriteError``
    naming ``path``."""
    # Through a Python file object: a failed write raises OSError (ENOSPC), where torch.save
    # to a path raises an opaque RuntimeError from its C++ writer.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def torch_load(path: str | os.PathLike, what: str, fix: str) -> Any:
    """The data saved at ``path`` (tensors, containers, numbers, strings: never code), on the CPU;
    a file that cannot be read so (truncated, garbage, a pickle of objects) is a UserError
    "cannot read <what> <path>: <why>; <fix>".  Loading warns of nothing: a user's file is judged
    by that one line."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever a foreign file makes the unpickler raise
        raise UserError(f"cannot read {what} {path}: {first_line(exc)}; {fix}") from None


def layout_difference(saved: Any, expected: Any, where: str) -> Optional[str]:
    """Where a loaded tree ``saved`` differs from ``expected`` in structure (dicts, lists), tensor
    shapes or dtypes, as ``where.key[i]: ...``; None if nowhere (other leaves are not compared)."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(saved, torch.Tensor) or (saved.shape, saved.dtype) != (expected.shape, expected.dtype):
            what = f"{tuple(saved.shape)} {saved.dtype}" if isinstance(saved, torch.Tensor) else type(saved).__name__
            return f"{where}: {what} where {tuple(expected.shape)} {expected.dtype} was expected"
        return None
    if isinstance(expected, dict):
        if not isinstance(saved, dict) or set(saved) != set(expected):
            missing = sorted(map(str, set(expected) - set(saved)))[:1] if isinstance(saved, dict) else []
            return f"{where}: other entries" + (f" (no {missing[0]})" if missing else "")
        return next((d for k in expected if (d := layout_difference(saved[k], expected[k], f"{where}.{k}"))), None)
    if isinstance(expected, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(expected):
            return f"{where}: another length"
        return next((d for i, (s, e) in enumerate(zip(saved, expected))
                     if (d := layout_difference(s, e, f"{where}[{i}]"))), None)
    return None


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` if needed and write (then remove) a file in it; a ``WriteError`` if that fails.
    The probe's name is this process's own (as a temporary write's): torchrun's ranks check one data
    root at the same moment, and a shared name let one rank delete the other's probe."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-test.{os.getpid()}.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(folder, exc.strerror or str(exc)) from None


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (someone else's counts as alive): the lock or temporary file of a
    dead one may be taken over or deleted."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files in ``folder`` that writes of processes no longer alive left
    behind (a kill mid-write); returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.glob(".*.tmp"):
        match = _TMP_NAME.match(path.name)
        if path.is_file() and (match is None or not process_alive(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
