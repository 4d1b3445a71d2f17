"""Many processes under ``torchrun`` (DESIGN §6): one device per rank, PyTorch's own collectives.

``python -m fastl2r.train`` stays one process; ``torchrun --nproc-per-node=N -m fastl2r.train``
starts N, and ``setup`` joins them into a process group (NCCL on CUDA, Gloo on the CPU) with a
timeout on every collective, so a rank that dies makes the others fail with a message instead
of waiting forever.  ``Ranks`` is what the trainer and the meta-test ask: how many ranks, which
one this is, and the few collectives they need (on one rank each is the identity).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import UserError

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of the job."""

    rank: int = 0
    world: int = 1

    @property
    def writer(self) -> bool:
        """Only rank 0 writes checkpoints, results and figures, and shows progress."""
        return self.rank == 0

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place)."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, value: Any) -> list:
        """Every rank's ``value`` (picklable), in rank order."""
        if self.world == 1:
            return [value]
        out: list = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for on one rank): e.g. until rank 0 has made the
        run folder."""
        if self.world > 1:
            dist.barrier()

    def leave(self) -> None:
        """The job's end: wait until every rank is done, so that none tears its connections down while
        another still uses them (Gloo can abort a process whose peer closes under it).  A rank that
        failed meanwhile ends the wait; its own error is the job's report."""
        if self.world > 1:
            try:
                dist.barrier()
            except RuntimeError:
                pass


SINGLE = Ranks()


def launched() -> bool:
    """Was this process started by ``torchrun`` (or another launcher setting the same variables)?"""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: Optional[str]) -> tuple[Ranks, torch.device]:
    """Join the job's process group if launched by ``torchrun``; returns this rank and its device.

    ``device``: ``cuda`` (one GPU per rank, ``LOCAL_RANK``), ``cpu``, or None (cuda if available).
    """
    target = resolve_device(device)
    if not launched():
        return SINGLE, target
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    if target.type == "cuda":  # every rank of the node sees the same count, so every one says so
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
        if per_node > torch.cuda.device_count():
            raise UserError(f"{per_node} processes on this node, but it has {torch.cuda.device_count()} GPU(s): "
                            "start at most one per GPU (torchrun --nproc-per-node)")
        target = torch.device("cuda", local)
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                                device_id=target if target.type == "cuda" else None)
    return Ranks(rank, world), target


def teardown() -> None:
    """Leave the job's process group, if this process joined one, as the command ends."""
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: Optional[str]) -> torch.device:
    """``cpu`` or ``cuda`` (None: cuda if available); a UserError if it cannot be had."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}; choose cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but this torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)
