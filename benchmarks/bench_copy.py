"""The device's copy bandwidth: one large tensor copy, the yardstick of every op's bandwidth.

Bytes model: the source read once and the destination written once.
"""
from __future__ import annotations

import pytest
import torch

from .harness import measure

SIZE = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}   # bytes of the source
ROUNDS = {"cpu": 5, "cuda": 100}


@pytest.mark.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_copy(benchmark, device):
    source = torch.rand(SIZE[device] // 4, device=device)
    target = torch.empty_like(source)
    measure(benchmark, lambda: target.copy_(source), op="copy", variant="torch", device=device, rounds=ROUNDS,
            bytes_moved=2 * SIZE[device])
