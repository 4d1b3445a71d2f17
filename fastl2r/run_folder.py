"""One run, one folder, one owner.

A run folder is created only once every input of its run has been checked.  While a process
writes into it, it holds ``run.lock``: an exclusive ``flock`` on a file that names the
process's PID.  The kernel drops the ``flock`` of a process that dies, and a PID that names no
live process is stale, so a lock left by a killed run is taken over; a live holder makes a
second writer stop with one line.  A folder that holds anything else is continued only with
``--resume``, and with the configuration it was started with (``config.json``).
"""
from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from . import _io
from .errors import UserError, WriteError
from .experiments import validate
from .methods import parse_methods
from .registry import load_plugin

LOCK = "run.lock"
CONFIG = "config.json"


class RunLock:
    """Holds ``<folder>/run.lock`` from ``__enter__`` to ``__exit__`` (the folder must exist)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"cannot lock the run folder {self.folder}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holder = _pid(os.read(fd, 64))
                if holder is not None and holder != os.getpid() and _io.process_alive(holder):
                    raise BlockingIOError  # a live process wrote it: a lock this kernel cannot see
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._busy()) from None
            # The holder may have removed the file between our open and our flock: lock the new one.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def _busy(self) -> str:
        try:
            holder = _pid(self.path.read_bytes())
        except OSError:
            holder = None
        who = f"process {holder}" if holder is not None else "another process"
        return (f"{self.folder} is in use: {who} is writing into it; wait for it to end or choose another "
                f"run folder (delete {self.path} only if no such process runs)")


def _pid(text: bytes) -> Optional[int]:
    try:
        return int(text.decode().strip())
    except (UnicodeDecodeError, ValueError):
        return None


def check_new(folder: Path) -> None:
    """A new run may use ``folder`` if it is an empty folder, or does not exist and can be made."""
    if folder.exists():
        if not folder.is_dir():
            raise UserError(f"cannot write to the output folder {str(folder)!r}: it is a file; choose another with --out")
        if any(p.name != LOCK for p in folder.iterdir()):
            raise UserError(f"the output folder {str(folder)!r} already holds files (an earlier run?); continue a run "
                            f"with --resume {folder}, or choose another --out")
        return
    parent = folder.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        reason = "not a folder" if not parent.is_dir() else "not writable"
        raise UserError(f"cannot write to the output folder {str(folder)!r}: {parent} is {reason}; "
                        "choose another with --out")


@contextmanager
def create(folder: Path) -> Iterator[None]:
    """Make ``folder`` for a new run and hold its lock; refused if another run got there first."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {str(folder)!r}: {exc.strerror or exc}; "
                        "choose another with --out") from None
    with RunLock(folder):
        check_new(folder)  # again, under the lock: a concurrent run may have written meanwhile
        try:
            _io.check_writable(folder)
        except WriteError as exc:
            raise UserError(f"cannot write to the output folder {str(folder)!r}: {exc.reason}; "
                            "choose another with --out") from None
        yield


def read_run(folder: Path) -> tuple[dict, dict]:
    """The configuration and the run facts (``methods_run``, ``device``, ``threads``, ``plugins``,
    ``parallel_runs``) that the run in ``folder`` was started with, validated like a new run's (its
    plugins loaded first)."""
    path = folder / CONFIG
    if not path.is_file():
        raise UserError(f"--resume {folder}: no {CONFIG} there; pass the folder of an earlier run")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume: {path} cannot be read as JSON ({exc})") from None
    try:
        if not isinstance(saved, dict):
            raise UserError(f"a run configuration is a JSON object, not a {type(saved).__name__}")
        run = {"methods_run": saved.pop("methods_run", None), "device": saved.pop("device", None),
               "threads": saved.pop("threads", None), "plugins": saved.pop("plugins", []),
               "parallel_runs": saved.pop("parallel_runs", 1)}  # runs of earlier releases went one by one
        saved.pop("ranks", None)  # each process's share when it last started: written anew on resume
        if not isinstance(run["plugins"], list) or not all(isinstance(p, str) for p in run["plugins"]):
            raise UserError(f"plugins must be a list of modules or files, got {json.dumps(run['plugins'])}")
        for spec in run["plugins"]:  # they register the names the configuration may use
            load_plugin(spec)
        validate(saved)
        methods = run["methods_run"]
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise UserError(f"methods_run must be a list of method names, got {json.dumps(methods)}")
        parse_methods(",".join(methods))
        if run["device"] not in ("cpu", "cuda"):
            raise UserError(f"device must be \"cpu\" or \"cuda\", got {json.dumps(run['device'])}")
        for key in ("threads", "parallel_runs"):
            value = run[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{key} must be a positive integer, got {json.dumps(value)}")
    except UserError as exc:
        raise UserError(f"--resume: {path}: {exc}") from None
    return saved, run


def write_run(folder: Path, config: dict, run: dict) -> None:
    """Write the run's ``config.json``: the configuration and the run facts (``methods_run``, ``device``,
    ``threads``, ``plugins``, ``parallel_runs``) that ``read_run`` gives back on ``--resume``, and the processes' shares
    (``ranks``) of this start."""
    _io.write_json(folder / CONFIG, {**config, **run})
