"""Live logs of a run, written as it goes (DESIGN §7.4).

In the run folder, ``metatrain.csv`` gets a line per finished meta-training episode and
``readouts.csv`` a line per readout (method, run, step, task).  Each line is one ``write`` to a
file opened for appending, so a run killed at any moment leaves whole lines.  A resumed run
appends too: work redone after a resume (episodes after the last checkpoint, an unfinished
method run) appears again, and its later line is the one to keep.  With ``tensorboard``, the
same values go to TensorBoard (``<run folder>/tensorboard``, flushed at every write).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional

from .errors import UserError

METATRAIN_CSV = "metatrain.csv"
READOUTS_CSV = "readouts.csv"
EPISODE_COLUMNS = ("episode", "steps", "final_loss", "mean_loss", "threshold", "tbptt", "ended_by", "checkpoint",
                   "tasks_reached")
READOUT_COLUMNS = ("method", "run", "step", "task", "task_name", "readout", "original")
TENSORBOARD_HINT = "pip install tensorboard"


def append_row(path: Path, columns: tuple[str, ...], row: dict) -> None:
    """Append ``row`` as a CSV line (after the header, to a new file) in one write."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size == 0:
            writer.writerow(columns)
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
        os.write(fd, text.getvalue().encode())
    finally:
        os.close(fd)


def summary_writer(log_dir: Path):
    """A ``torch.utils.tensorboard.SummaryWriter``, or a one-line error if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None
    return SummaryWriter(log_dir=str(log_dir))


class RunLog:
    """The live logs of a run in ``out_dir`` (None: none are written).  In a job of several ranks
    every rank appends the readouts it measures (whole lines, one write each) and only the
    ``writer`` the meta-training episodes, which every rank knows."""

    def __init__(self, out_dir: Optional[Path], tensorboard: bool = False, writer: bool = True):
        if tensorboard and out_dir is None:
            raise UserError("TensorBoard logs go into the run folder: give an output folder")
        self.out_dir = out_dir
        self.writer = writer
        self.tensorboard = summary_writer(out_dir / "tensorboard") if tensorboard else None

    def episode(self, record: dict) -> None:
        """Log a finished meta-training episode (``EpisodeRecord``'s fields): a line of ``metatrain.csv`` (by
        the writer rank) and its values in TensorBoard."""
        if self.out_dir is not None and self.writer:
            append_row(self.out_dir / METATRAIN_CSV, EPISODE_COLUMNS, record)
        if self.tensorboard is not None:
            for key in ("final_loss", "mean_loss", "threshold", "steps", "tbptt"):
                self.tensorboard.add_scalar(f"metatrain/{key}", record[key], record["episode"])
            self.tensorboard.flush()

    def readout(self, method: str, run: int, step: int, task: int, task_name: str, readout: float,
                original: Optional[float]) -> None:
        """One readout of task ``task`` (0 = Task A) at meta-test step ``step``; accuracies as fractions."""
        row = {"method": method, "run": run, "step": step, "task": f"task{task + 1}", "task_name": task_name,
               "readout": readout, "original": original}
        if self.out_dir is not None:
            append_row(self.out_dir / READOUTS_CSV, READOUT_COLUMNS, row)
        if self.tensorboard is not None:
            for kind in ("readout", "original"):
                if row[kind] is not None:
                    self.tensorboard.add_scalar(f"{kind}/{row['task']}/{method}/run{run}", 100 * row[kind], step)
            self.tensorboard.flush()
