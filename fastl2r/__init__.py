"""fastl2r: Learning to Remember from a Multi-Task Teacher, with fused GPU kernels.

The extension API — ``register_architecture``, ``register_dataset``, ``register_method``,
``ClassSplit`` and ``load_plugin`` (``fastl2r.registry``) — is importable from here; it is
imported on first use, so that ``import fastl2r.<module>`` stays light.
"""
__version__ = "0.1.0"

_REGISTRY_API = ("ClassSplit", "load_plugin", "register_architecture", "register_dataset", "register_method")
__all__ = ["__version__", *_REGISTRY_API]


def __getattr__(name: str):
    if name in _REGISTRY_API:
        from . import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'fastl2r' has no attribute {name!r}")
