"""NVTX ranges around the phases of an inner step and of the readout, for Nsight Systems.

``FASTL2R_NVTX=1`` turns them on (read at import; ``configure`` reads it again), so that
``nsys profile -t cuda,nvtx python -m fastl2r.train …`` shows ``teacher_step``,
``student_grad``, ``meta_update``, ``meta_loss``, ``meta_backward`` and ``readout``.
The ``nvtx`` package is optional (``pip install fastl2r[nvtx]``): with it the ranges
are in the ``fastl2r`` domain; without it they come from ``torch.cuda.nvtx`` (the
default domain) on a CUDA build of torch, and a CPU build of torch emits none.  Off,
``nvtx_range`` returns one shared no-op context manager: a call and a test, no allocation.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, ContextManager, Optional

import torch

DOMAIN = "fastl2r"
_NOOP = contextlib.nullcontext()
_open_range: Optional[Callable[[str], ContextManager]] = None


def _range_opener() -> Optional[Callable[[str], ContextManager]]:
    """How to open a range here: ``nvtx.annotate`` in our domain, else ``torch.cuda.nvtx.range``
    on a CUDA build of torch, else None."""
    try:
        import nvtx
    except ImportError:
        pass
    else:
        return lambda name: nvtx.annotate(name, domain=DOMAIN)
    if torch.version.cuda is not None:
        return torch.cuda.nvtx.range
    return None


def configure() -> bool:
    """Read ``FASTL2R_NVTX`` again; returns whether ranges are emitted from now on."""
    global _open_range
    _open_range = None
    if os.environ.get("FASTL2R_NVTX", "0") != "1":
        return False
    _open_range = _range_opener()
    if _open_range is None:
        warnings.warn("FASTL2R_NVTX=1, but neither the nvtx package nor a CUDA build of torch is installed, "
                      "so no NVTX ranges are emitted (`pip install nvtx` adds them)", stacklevel=2)
    return _open_range is not None


def nvtx_range(name: str) -> ContextManager:
    """Mark ``name`` on the NVTX timeline for the duration of a ``with`` block."""
    return _NOOP if _open_range is None else _open_range(name)


configure()
