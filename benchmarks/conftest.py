"""Benchmark session set-up: what the JSON records about the machine, and shared inputs."""
from __future__ import annotations

import platform

import pytest
import torch

from .harness import update_inputs


def pytest_benchmark_update_machine_info(config, machine_info):
    """Versions and devices, so a table from the JSON says what it was measured on."""
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["python"] = platform.python_version()
    try:
        import triton
        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None


@pytest.fixture(scope="session")
def resnet32_update():
    """One resnet32_gn meta-learner update's inputs per device, built once per session."""
    cache = {}

    def get(device: str):
        if device not in cache:
            cache[device] = update_inputs("resnet32_gn", device)
        return cache[device]
    return get
