"""Which backends exist, for which devices, and which one an op call gets.

Adding a backend means adding one entry to ``BACKENDS`` (and its own files).
``FASTL2R_BACKEND`` (or ``use_backend``) forces one: if it cannot run, that is an
error naming why.  Otherwise the first available backend of ``AUTO_ORDER`` for the
tensor's device wins, and an unavailable one is skipped with one warning line.

Backends are loaded by ``import`` statements, not ``importlib``, so that
``torch.compile(fullgraph=True)`` can trace the first op call too (Dynamo runs an
``import`` while tracing but refuses ``importlib``).
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch


class BackendError(RuntimeError):
    """A requested backend cannot run here."""


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable[[], ModuleType]                # the module with channel_means, meta_lstm, gated_update
    devices: tuple[str, ...]                      # device types it can run on
    unavailable: Callable[[str], Optional[str]]   # device type -> why it cannot run, or None


def _always(device_type: str) -> Optional[str]:
    return None


def _load_reference() -> ModuleType:
    from . import reference
    return reference


def _load_triton() -> ModuleType:
    from . import triton_backend
    return triton_backend


def _load_compiled() -> ModuleType:
    from . import cpp_backend
    return cpp_backend


def _import_c() -> None:
    from .. import _C  # noqa: F401


def _import_c_cuda() -> None:
    from .. import _C_cuda  # noqa: F401


def _compiled(module: str, load_extension: Callable[[], None]) -> Callable[[str], Optional[str]]:
    """A backend whose kernels live in the compiled extension ``module`` (csrc/)."""
    def unavailable(device_type: str) -> Optional[str]:
        try:
            load_extension()
        except (ImportError, OSError) as exc:
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
            return (f"its extension {module} is not built or does not load ({first_line}); "
                    "build it with `pip install --no-build-isolation -e .`")
        return None
    return unavailable


def _triton(device_type: str) -> Optional[str]:
    """Triton compiles for CUDA GPUs; on the CPU it runs only in its interpreter (for tests),
    which ``triton.jit`` chooses when a kernel is defined: ``TRITON_INTERPRET=1`` must be set
    before ``fastl2r.kernels`` is imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (`pip install triton`)"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing fastl2r"
        from .. import kernels
        if not kernels.INTERPRETED:
            return ("fastl2r's Triton kernels were imported before TRITON_INTERPRET=1 was set, so they were "
                    "compiled for GPUs: set it before importing fastl2r")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU is available"
    return None


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", _load_reference, ("cpu", "cuda"), _always),
    "triton": Backend("triton", _load_triton, ("cpu", "cuda"), _triton),
    "cpp": Backend("cpp", _load_compiled, ("cpu",), _compiled("fastl2r._C", _import_c)),
    "cuda": Backend("cuda", _load_compiled, ("cuda",), _compiled("fastl2r._C_cuda", _import_c_cuda)),
}

AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpp", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}

_override = threading.local()
_warned: set[tuple[str, str]] = set()
_cache: dict[tuple[Optional[str], str], ModuleType] = {}


def requested_backend() -> Optional[str]:
    """The forced backend: ``use_backend`` if active, else ``$FASTL2R_BACKEND``, else None."""
    return getattr(_override, "name", None) or os.environ.get("FASTL2R_BACKEND") or None


@contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend inside the block (``None`` restores the automatic choice)."""
    previous = getattr(_override, "name", None)
    _override.name = name
    try:
        yield
    finally:
        _override.name = previous


def _why_not(backend: Backend, device_type: str) -> Optional[str]:
    if device_type not in backend.devices:
        return f"it runs on {', '.join(backend.devices)} tensors, not {device_type}"
    return backend.unavailable(device_type)


def backend_name(device_type: str) -> str:
    """Name of the backend an op on a ``device_type`` tensor uses now."""
    forced = requested_backend()
    if forced is not None:
        backend = BACKENDS.get(forced)
        if backend is None:
            raise BackendError(
                f"unknown backend {forced!r} (from FASTL2R_BACKEND or use_backend); "
                f"known backends: {', '.join(sorted(BACKENDS))}")
        reason = _why_not(backend, device_type)
        if reason is not None:
            raise BackendError(f"backend {forced!r} was requested but cannot run: {reason}")
        return forced
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        reason = _why_not(BACKENDS[name], device_type)
        if reason is None:
            return name
        if (name, device_type) not in _warned:
            _warned.add((name, device_type))
            warnings.warn(f"fastl2r: {name} backend skipped on {device_type}: {reason}", stacklevel=4)
    raise BackendError(f"no fastl2r backend can run on {device_type} tensors")


def _resolve(device_type: str) -> ModuleType:
    key = (requested_backend(), device_type)
    module = _cache.get(key)
    if module is None:
        module = BACKENDS[backend_name(device_type)].load()
        _cache[key] = module
    return module


def backend_for(device: "str | object") -> ModuleType:
    """The module implementing the ops for tensors on ``device``."""
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    return _resolve(device_type)
