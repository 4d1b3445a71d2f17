"""Per-channel activation means of every layer, gathered during the forward pass.

The meta-learner's features include, for each conv / GroupNorm / (non-head) linear
layer, the mean over batch and space of its input and of its output.  Forward hooks
keep references to those activations as the forward runs (no second forward);
``means()`` then computes every mean in one ``fastl2r.ops.channel_means`` call.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from .. import ops

TAPPED_TYPES = (nn.Conv2d, nn.GroupNorm, nn.Linear)


@dataclass(frozen=True)
class TappedLayer:
    name: str
    in_channels: int
    out_channels: int
    in_offset: int    # where this layer's input means start in the flat means vector
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


class ActivationTaps:
    """Hooks on ``model`` that record layer inputs/outputs inside ``with taps.record():``."""

    def __init__(self, model: nn.Module, head_prefix: str = "heads"):
        self.layers = tapped_layers(model, head_prefix)
        modules = dict(model.named_modules())
        self._activations: list[torch.Tensor | None] = [None] * (2 * len(self.layers))
        self._recording = False
        self._handles = [modules[layer.name].register_forward_hook(self._hook(i))
                         for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if self._recording:
                self._activations[2 * index] = inputs[0].detach()
                self._activations[2 * index + 1] = output.detach()
        return record

    @contextmanager
    def record(self) -> Iterator["ActivationTaps"]:
        """Record the activations of the forward passes run inside the block (the last one wins)."""
        self.clear()
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def start(self) -> None:
        """Record every forward pass from now on (the last one wins) until ``stop``."""
        self._recording = True

    def stop(self) -> None:
        self._recording = False

    @property
    def size(self) -> int:
        last = self.layers[-1]
        return last.out_offset + last.out_channels if self.layers else 0

    def means(self) -> torch.Tensor:
        """All recorded per-channel means, flat, in ``layers`` order (input then output)."""
        missing = [self.layers[i // 2].name for i, a in enumerate(self._activations) if a is None]
        if missing:
            raise RuntimeError(f"no activation was recorded for layers {missing[:5]}; run the forward "
                               "pass inside `with taps.record():`")
        return ops.channel_means(self._activations)

    def clear(self) -> None:
        """Drop the recorded activations (they keep the forward's memory alive)."""
        self._activations = [None] * len(self._activations)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
