"""Run the CLI in this process and stop it hard at a chosen point (tests of resume and locking):

    python kill_at.py POINT N ACTION -- <arguments of python -m fastl2r.train>

The N-th time the run reaches POINT it either kills itself with SIGKILL (ACTION ``kill``: no
cleanup, no atexit, like ``kill -9``) or, for ACTION a file path, creates that file and waits
until it is deleted (a writer held in the middle of its run).
"""
import os
import signal
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from fastl2r import metatest
from fastl2r.meta.trainer import MetaTrainer
from fastl2r.train import main


def _stop(action: str) -> None:
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    flag = Path(action)
    flag.write_text(str(os.getpid()))
    while flag.exists():
        time.sleep(0.05)


def _counting(n: int, action: str):
    count = 0

    def arrive() -> None:
        nonlocal count
        count += 1
        if count == n:
            _stop(action)
    return arrive


def _before(owner, name: str, arrive) -> None:
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        arrive()
        return real(*args, **kwargs)
    setattr(owner, name, wrapped)


def _after_saving(file_part: str, arrive) -> None:
    """After ``torch.save`` has written a file whose name holds ``file_part`` (its temporary file,
    before the rename that would put it in place)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        real(obj, f, *args, **kwargs)
        if file_part in str(getattr(f, "name", f)):
            f.flush()
            arrive()
    torch.save = save


POINTS = {
    "metatrain-window": lambda arrive: _before(MetaTrainer, "run_window", arrive),
    "metatrain-checkpoint-write": lambda arrive: _after_saving("metatrain_checkpoint", arrive),
    "metatest-run": lambda arrive: _before(metatest, "run_method", arrive),
    "metatest-progress-write": lambda arrive: _after_saving("metatest_progress", arrive),
    "figure-write": lambda arrive: _before(Figure, "savefig", arrive),  # its temporary file exists
}


if __name__ == "__main__":
    point, n, action, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: kill_at.py POINT N ACTION -- ARGS"
    POINTS[point](_counting(int(n), action))
    sys.exit(main(argv))
