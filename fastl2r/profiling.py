"""NVTX ranges around the phases of an inner step and of the readout, for Nsight Systems.

``FASTL2R_NVTX=1`` turns them on (read at import; ``configure`` reads it again), so that
``nsys profile -t cuda,nvtx python -m fastl2r.train …`` shows ``teacher_step``,
``student_grad``, ``meta_update``, ``meta_loss``, ``meta_backward`` and ``readout`` in
the ``fastl2r`` domain.  Off, ``nvtx_range`` returns one shared no-op context manager:
a call and a test, no allocation.
"""
from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import ContextManager, Optional

from .errors import UserError

DOMAIN = "fastl2r"
_NOOP = contextlib.nullcontext()
_nvtx: Optional[ModuleType] = None


def configure() -> bool:
    """Read ``FASTL2R_NVTX`` again; returns whether ranges are emitted from now on."""
    global _nvtx
    if os.environ.get("FASTL2R_NVTX", "0") != "1":
        _nvtx = None
        return False
    try:
        import nvtx
    except ImportError:
        raise UserError("FASTL2R_NVTX=1 needs the nvtx package: `pip install nvtx`, or unset FASTL2R_NVTX") from None
    _nvtx = nvtx
    return True


def nvtx_range(name: str) -> ContextManager:
    """Mark ``name`` on the NVTX timeline for the duration of a ``with`` block."""
    return _NOOP if _nvtx is None else _nvtx.annotate(name, domain=DOMAIN)


configure()
