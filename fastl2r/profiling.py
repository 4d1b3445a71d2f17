"""NVTX ranges around the phases of an inner step, for Nsight Systems.

Enabled with ``FASTL2R_NVTX=1`` (read once, at import); when off, ``nvtx_range``
returns a shared no-op context manager and costs one function call.
"""
from __future__ import annotations

import contextlib
import os

ENABLED = os.environ.get("FASTL2R_NVTX", "0") == "1"
_NOOP = contextlib.nullcontext()

if ENABLED:
    import nvtx

    def nvtx_range(name: str):
        return nvtx.annotate(name, domain="fastl2r")
else:
    def nvtx_range(name: str):
        return _NOOP
