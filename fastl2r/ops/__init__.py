"""The fused operations of fastl2r, one function each, and which backend runs them.

Everything above this package calls these functions and gets the fastest correct
backend for the tensors' device.  Inputs are checked here, once, for every backend;
gradients, activations and other features are constants of the meta-gradient, so they
are detached here too.

Backends: adding one means adding one entry to ``BACKENDS`` (and its own files).
``FASTL2R_BACKEND`` (or ``use_backend``) forces one: if it cannot run, that is an error
naming why.  Otherwise the first available backend of ``AUTO_ORDER`` for the tensor's
device wins, and an unavailable one is skipped with one warning line.  Backends are
loaded by ``import`` statements, not ``importlib``, so that ``torch.compile(fullgraph=True)``
can trace the first op call too (Dynamo runs an ``import`` while tracing but refuses
``importlib``).
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional, Sequence

import torch

from .layout import NUM_CELLS, GroupDims
from .reference import unpack_head, unpack_lstm

__all__ = [
    "channel_means", "meta_lstm", "gated_update", "GroupDims", "unpack_lstm", "unpack_head",
    "NUM_CELLS", "BACKENDS", "BackendError", "backend_for", "backend_name", "requested_backend",
    "use_backend",
]


# ----- backends -----
class BackendError(RuntimeError):
    """The ops cannot run as asked: the forced backend is unknown or cannot run here, or no backend can run on
    the device."""


@dataclass(frozen=True)
class Backend:
    """One way to run the ops (an entry of ``BACKENDS``): how to load its module, the device types it serves
    and why it cannot run here."""

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


# ----- the ops -----
def channel_means(activations: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-channel means over every dim but 1 of each activation, concatenated: ``[sum C_l]``.

    One call for the whole list (one launch on the fused backends).  No gradient.
    """
    activations = list(activations)
    if not activations:
        raise ValueError("channel_means needs at least one activation")
    first = activations[0]
    for x in activations:
        if x.dim() < 2:
            raise ValueError(f"channel_means: activations need a channel dim 1, got shape {tuple(x.shape)}")
        if x.device != first.device or x.dtype != first.dtype:
            raise ValueError("channel_means: all activations must share one device and dtype")
    with torch.no_grad():  # the means are constants: nothing to record, nothing to detach
        return backend_for(first.device).channel_means(activations)


def _check_rows(rows: Sequence[int], total: int, groups: int) -> tuple[tuple[int, ...], int]:
    """``rows`` as ints, and the number of episode slots ``total`` rows hold."""
    rows = tuple(int(r) for r in rows)
    if len(rows) != groups or any(r <= 0 for r in rows) or total % sum(rows):
        raise ValueError(f"rows {list(rows)} must be {groups} positive counts whose sum divides the group's "
                         f"{total} rows (one per episode slot)")
    return rows, total // sum(rows)


def meta_lstm(w: torch.Tensor, g: torch.Tensor, a_row: torch.Tensor, a_shared: torch.Tensor,
              lstm: torch.Tensor, rows: Sequence[int], h: torch.Tensor, c: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The three stacked meta-LSTM cells for every row of a group of meta-nets, for every
    episode slot (see reference: ``rows`` counts one slot's rows)."""
    G = lstm.shape[0]
    dims = GroupDims.of(w, a_row, a_shared, h)
    R = w.shape[0]
    rows, slots = _check_rows(rows, R, G)
    if g.shape != w.shape or a_row.shape[0] != R or a_shared.shape[0] != G * slots:
        raise ValueError(f"meta_lstm: inconsistent shapes w {tuple(w.shape)}, g {tuple(g.shape)}, "
                         f"a_row {tuple(a_row.shape)}, a_shared {tuple(a_shared.shape)} for {G} tensors "
                         f"and {slots} slots")
    if h.shape != (NUM_CELLS, R, dims.H) or c.shape != h.shape:
        raise ValueError(f"meta_lstm: state must be [{NUM_CELLS}, {R}, H], got h {tuple(h.shape)}, c {tuple(c.shape)}")
    if lstm.shape[1] != dims.lstm_size:
        raise ValueError(f"meta_lstm: lstm has {lstm.shape[1]} columns, expected {dims.lstm_size} for {dims}")
    return backend_for(w.device).meta_lstm(w, _constant(g), _constant(a_row), _constant(a_shared), lstm, rows, h, c)


def gated_update(h3: torch.Tensor, head: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                 rows: Sequence[int], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``δ = s·tanh(W_out h3 + b_out)``, ``w_new = w − lr·δ⊙g``; returns ``(w_new, δ)``.
    ``rows`` counts one slot's rows, as for ``meta_lstm``: tensor t's S·rows[t] rows use head t."""
    R, K = w.shape
    G = head.shape[0]
    if g.shape != w.shape or h3.dim() != 2 or h3.shape[0] != R:
        raise ValueError(f"gated_update: inconsistent shapes h3 {tuple(h3.shape)}, w {tuple(w.shape)}, g {tuple(g.shape)}")
    expected = GroupDims(K=K, Ar=0, Ds=0, H=h3.shape[1]).head_size
    if head.shape[1] != expected:
        raise ValueError(f"gated_update: head has {head.shape[1]} columns, expected {expected} (K={K}, H={h3.shape[1]})")
    rows, slots = _check_rows(rows, R, G)
    return backend_for(w.device).gated_update(h3, head, w, _constant(g), tuple(slots * r for r in rows), float(lr))


def _constant(x: torch.Tensor) -> torch.Tensor:
    """``x`` out of the graph (a constant of the meta-gradient); no dispatch when it is already."""
    return x.detach() if x.requires_grad else x
