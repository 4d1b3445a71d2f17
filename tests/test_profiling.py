"""NVTX ranges (DESIGN §5): the phases of an inner step and the readout, with FASTL2R_NVTX=1;
the nvtx package is optional (tests/test_gpu_check.py also imports every test module without it)."""
import contextlib
import sys
import types

import pytest
import torch
import torch.nn as nn

from fastl2r import profiling
from benchmarks.harness import InnerStepRig
from fastl2r.readout import ReadoutSet


class RangeRecorder:
    """Stands in for ``nvtx.annotate`` or ``torch.cuda.nvtx.range``: records every range opened and
    closed, in order."""

    def __init__(self):
        self.events: list[tuple[str, str, str]] = []

    def __call__(self, message=None, color=None, domain=None, **kwargs):
        @contextlib.contextmanager
        def annotated():
            self.events.append(("open", message, domain))
            yield
            self.events.append(("close", message, domain))
        return annotated()

    def opened(self) -> list[str]:
        return [name for kind, name, _ in self.events if kind == "open"]


def fake_nvtx(annotate) -> types.ModuleType:
    """An ``nvtx`` module whose ``annotate`` is ``annotate`` (whether or not nvtx is installed)."""
    module = types.ModuleType("nvtx")
    module.annotate = annotate
    return module


@pytest.fixture
def recorder(monkeypatch):
    """FASTL2R_NVTX=1 with nvtx's annotate replaced by a recorder; off again afterwards."""
    recorder = RangeRecorder()
    monkeypatch.setitem(sys.modules, "nvtx", fake_nvtx(recorder))
    monkeypatch.setenv("FASTL2R_NVTX", "1")
    assert profiling.configure()
    yield recorder
    monkeypatch.delenv("FASTL2R_NVTX")
    assert not profiling.configure()


@pytest.fixture
def nvtx_hidden(monkeypatch):
    """``import nvtx`` fails, as where the package is not installed; FASTL2R_NVTX=1; off afterwards."""
    monkeypatch.setitem(sys.modules, "nvtx", None)
    monkeypatch.setenv("FASTL2R_NVTX", "1")
    yield
    monkeypatch.delenv("FASTL2R_NVTX")
    assert not profiling.configure()


def test_one_inner_step_opens_the_phases_in_order(recorder):
    rig = InnerStepRig("resnet8_gn", conv_hidden=4, norm_hidden=2)
    recorder.events.clear()
    rig.step()
    phases = ["teacher_step", "student_grad", "meta_update", "meta_loss", "meta_backward"]
    assert recorder.events == [(kind, name, "fastl2r") for name in phases for kind in ("open", "close")]


def test_readout_is_one_range(recorder):
    train = (torch.randn(6, 1, 8, 8), torch.tensor([0, 1] * 3))
    test = (torch.randn(4, 1, 8, 8), torch.tensor([0, 1] * 2))
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ReadoutSet(train, test, steps=2).evaluate(net)
    assert recorder.opened() == ["readout"]


def test_without_nvtx_a_cuda_build_of_torch_opens_torch_cuda_nvtx_ranges(nvtx_hidden, monkeypatch):
    recorder = RangeRecorder()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda.nvtx, "range", recorder)
    assert profiling.configure()
    with profiling.nvtx_range("teacher_step"):
        pass
    assert recorder.events == [("open", "teacher_step", None), ("close", "teacher_step", None)]


def test_without_nvtx_a_cpu_build_of_torch_emits_no_ranges(nvtx_hidden, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.warns(UserWarning, match="no NVTX ranges"):
        assert not profiling.configure()
    assert profiling.nvtx_range("teacher_step") is profiling.nvtx_range("readout")  # the shared no-op


def test_ranges_cost_nothing_when_off(monkeypatch):
    monkeypatch.delenv("FASTL2R_NVTX", raising=False)
    monkeypatch.setitem(sys.modules, "nvtx", fake_nvtx(lambda *a, **k: pytest.fail("nvtx called while off")))
    assert not profiling.configure()
    assert profiling.nvtx_range("teacher_step") is profiling.nvtx_range("readout")  # one shared no-op
