"""NVTX ranges (DESIGN §5): the phases of an inner step and the readout, with FASTL2R_NVTX=1."""
import contextlib
import types

import nvtx
import pytest
import torch
import torch.nn as nn

from fastl2r import profiling
from fastl2r.data import Batch
from fastl2r.meta import MetaLearner
from fastl2r.meta.student import FunctionalStudent
from fastl2r.meta.training import EpisodeState, MetaTrainer, inner_step
from fastl2r.readout import ReadoutSet


class RangeRecorder:
    """Stands in for ``nvtx.annotate``: records every range opened and closed, in order."""

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


@pytest.fixture
def recorder(monkeypatch):
    """FASTL2R_NVTX=1 with nvtx's annotate replaced by a recorder; off again afterwards."""
    recorder = RangeRecorder()
    monkeypatch.setattr(nvtx, "annotate", recorder)
    monkeypatch.setenv("FASTL2R_NVTX", "1")
    assert profiling.configure()
    yield recorder
    monkeypatch.delenv("FASTL2R_NVTX")
    assert not profiling.configure()


class TinyNet(nn.Module):
    """One conv and one GroupNorm, a 4-d representation, two heads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 3)])

    def forward(self, x):
        return torch.relu(self.gn(self.conv(x))).mean((2, 3))


def batch(n: int, classes: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g),
                 torch.zeros(n, dtype=torch.long))


def test_one_inner_step_opens_the_phases_in_order(recorder):
    torch.manual_seed(0)
    teacher = TinyNet()
    meta = MetaLearner(teacher, conv_hidden=8, norm_hidden=4)
    student = FunctionalStudent(TinyNet(), meta)
    student.load(teacher)
    ep = EpisodeState(teacher, student, meta.initial_state(), 1)
    trainer = types.SimpleNamespace(meta=meta, optimizer=torch.optim.Adam(meta.parameters()))

    loss = inner_step(ep, batch(4, 2, 1), batch(4, 3, 2), lr=0.1, loss_scale=300.0, theta=meta.snapshot())
    assert MetaTrainer.meta_update(trainer, loss) == pytest.approx(loss.item())

    phases = ["teacher_step", "student_grad", "meta_update", "meta_loss", "meta_backward"]
    assert recorder.events == [(kind, name, "fastl2r") for name in phases for kind in ("open", "close")]


def test_readout_is_one_range(recorder):
    task = types.SimpleNamespace(dataset=((0.5,), (0.25,)), num_classes=2,  # (mean, std) of one channel
                                 train_images=lambda: torch.randint(0, 255, (6, 1, 8, 8), dtype=torch.uint8),
                                 train_labels=lambda: torch.tensor([0, 1] * 3),
                                 test_images=lambda: torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8),
                                 test_labels=lambda: torch.tensor([0, 1] * 2))
    ReadoutSet(task, "cpu", steps=2).evaluate(TinyNet())
    assert recorder.opened() == ["readout"]


def test_ranges_cost_nothing_when_off(monkeypatch):
    monkeypatch.delenv("FASTL2R_NVTX", raising=False)
    monkeypatch.setattr(nvtx, "annotate", lambda *a, **k: pytest.fail("nvtx called while FASTL2R_NVTX is off"))
    assert not profiling.configure()
    assert profiling.nvtx_range("teacher_step") is profiling.nvtx_range("readout")  # one shared no-op
