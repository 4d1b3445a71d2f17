"""Per-channel activation means of every layer, gathered during the forward pass.

The meta-learner's features include, for each conv / GroupNorm / (non-head) linear
layer, the mean over batch and space of its input and of its output.  Forward hooks
keep references to those activations as the forward runs (no second forward); one
``fastl2r.ops.channel_means`` call then computes every mean.

``record_activations`` holds its hooks for one ``with`` block only, so a network used
for thousands of episodes never accumulates hooks; ``ActivationTaps`` keeps them for
the life of a ``LearnedOptimizer``, which reads the activations of its user's forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .. import ops

TAPPED_TYPES = (nn.Conv2d, nn.GroupNorm, nn.Linear)


@dataclass(frozen=True)
class TappedLayer:
    name: str
    in_channels: int
    out_channels: int
    in_offset: int    # where this layer's input means start in the flat means vector (one slot)
    out_offset: int   # where its output means start


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, module.num_channels
    return module.in_features, module.out_features


def is_head(name: str, head_prefix: str) -> bool:
    return name == head_prefix or name.startswith(head_prefix + ".")


def tapped_layers(model: nn.Module, head_prefix: str = "heads") -> list[TappedLayer]:
    """The tapped layers of ``model`` in registration order, with their offsets."""
    layers, offset = [], 0
    for name, module in model.named_modules():
        if isinstance(module, TAPPED_TYPES) and not is_head(name, head_prefix):
            c_in, c_out = _channels(module)
            layers.append(TappedLayer(name, c_in, c_out, offset, offset + c_in))
            offset += c_in + c_out
    return layers


def _register(model: nn.Module, layers: list[TappedLayer], slots: list[Optional[torch.Tensor]]) -> list:
    """Hooks writing each tapped layer's (input, output) into ``slots[2i]``, ``slots[2i + 1]``."""
    modules = dict(model.named_modules())

    def hook(index: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            slots[2 * index] = inputs[0]  # only their means are used, out of the graph
            slots[2 * index + 1] = output
        return record

    return [modules[layer.name].register_forward_hook(hook(i)) for i, layer in enumerate(layers)]


def activation_means(layers: list[TappedLayer], activations: list[Optional[torch.Tensor]]) -> torch.Tensor:
    """Every recorded per-channel mean, flat, in ``layers`` order (input then output); folded
    activations give each layer's means slot by slot."""
    missing = [layers[i // 2].name for i, a in enumerate(activations) if a is None]
    if missing:
        raise RuntimeError(f"no activation was recorded for layers {missing[:5]}: did the forward pass "
                           "run through them?")
    return ops.channel_means(activations)


@contextmanager
def record_activations(model: nn.Module, layers: list[TappedLayer]) -> Iterator[list]:
    """Inside the block, forward passes of ``model`` write its tapped layers' inputs and outputs
    into the yielded list (the last pass wins); the hooks are gone when the block ends."""
    activations: list[Optional[torch.Tensor]] = [None] * (2 * len(layers))
    handles = _register(model, layers, activations)
    try:
        yield activations
    finally:
        for handle in handles:
            handle.remove()


class ActivationTaps:
    """Hooks on ``model``, until ``remove()``, recording the inputs and outputs of its tapped layers
    in every forward pass (the last one wins)."""

    def __init__(self, model: nn.Module, head_prefix: str = "heads"):
        self.layers = tapped_layers(model, head_prefix)
        self._activations: list[Optional[torch.Tensor]] = [None] * (2 * len(self.layers))
        self._handles = _register(model, self.layers, self._activations)

    def means(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The means of the last forward pass (see ``activation_means``), in ``dtype`` if given
        (under ``torch.autocast`` a network's activations come in several dtypes)."""
        activations = self._activations
        if dtype is not None:
            activations = [a if a is None or a.dtype == dtype else a.to(dtype) for a in activations]
        return activation_means(self.layers, activations)

    def clear(self) -> None:
        """Drop the recorded activations (they keep the forward's memory alive)."""
        self._activations[:] = [None] * len(self._activations)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
