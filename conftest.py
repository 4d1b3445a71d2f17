"""Shared test configuration: markers, deterministic CPU threads, Triton's interpreter."""
import os

import pytest
import torch

# Without a GPU, Triton's kernels run on CPU tensors in its interpreter, which
# ``triton.jit`` chooses when each kernel is defined: so it is switched on here, before
# any test imports fastl2r's kernels.  With a GPU it stays off and the same tests run
# compiled on CUDA.  An explicit TRITON_INTERPRET in the environment is left as it is.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def registries():
    """Whatever a test registers (architectures, datasets and suites, methods) is gone after it."""
    from fastl2r.data import DATASETS
    from fastl2r.experiments import TASKS
    from fastl2r.methods import METHOD_OPTIONS, METHODS
    from fastl2r.models import ARCHITECTURES

    tables = (ARCHITECTURES, DATASETS, METHODS, METHOD_OPTIONS, TASKS)
    saved = [dict(table) for table in tables]
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end runs of the CLI")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
