"""Channel means of every tapped layer's input and output of resnet32_gn at batch 64, one call.

Bytes model (the floor): every activation read once, every mean written once.
"""
from __future__ import annotations

import pytest
import torch

from fastl2r import ops
from fastl2r.models import resnet32_gn
from fastl2r.meta.metalearner import tapped_layers

from .harness import measure, forced, require, variant_params

BATCH = 64
ROUNDS = {"cpu": 5, "cuda": 200}


def resnet32_activations(device: str, batch: int = BATCH, seed: int = 0) -> list[torch.Tensor]:
    """The inputs and outputs of every conv and GroupNorm of resnet32_gn on one random batch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet32_gn(3).to(device)
    modules = dict(model.named_modules())
    activations: list[torch.Tensor] = []

    def keep(module, inputs, output):
        activations.extend((inputs[0].detach(), output.detach()))
    hooks = [modules[layer.name].register_forward_hook(keep) for layer in tapped_layers(model)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 32, 32, generator=gen).to(device))
    for hook in hooks:
        hook.remove()
    return activations


def channel_means_bytes(activations: list[torch.Tensor]) -> int:
    read = sum(x.numel() * x.element_size() for x in activations)
    written = sum(x.shape[1] * x.element_size() for x in activations)
    return read + written


@pytest.mark.parametrize("device,variant", variant_params())
def test_channel_means(benchmark, device, variant):
    require(variant, device)
    activations = resnet32_activations(device)
    run = forced(variant, ops.channel_means)
    measure(benchmark, lambda: run(activations), op="channel_means", variant=variant, device=device,
            rounds=ROUNDS, bytes_moved=channel_means_bytes(activations))
