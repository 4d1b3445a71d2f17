"""Multi-head networks: one linear head per task on a shared representation (DESIGN §1.1).

Every network fastl2r trains answers ``model(x)`` with the representation ``[N, D]`` and keeps
its tasks' heads in ``model.heads`` (``heads[t](model(x))`` are task ``t``'s logits), adding one
with ``model.add_head(num_classes)``.  ``MultiHeadNet`` gives any backbone that interface.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class MultiHead(nn.Module):
    """The head handling shared by every multi-head network: ``heads`` and ``representation_dim``
    are the subclass's."""

    heads: nn.ModuleList
    representation_dim: int

    def add_head(self, num_classes: int) -> int:
        """Append a fresh ``Linear(representation_dim, num_classes)`` head (on the network's device
        and dtype); returns its task index."""
        head = nn.Linear(self.representation_dim, num_classes)
        param = next(self.parameters(), None)
        if param is not None:
            head = head.to(device=param.device, dtype=param.dtype)
        self.heads.append(head)
        return len(self.heads) - 1

    def logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Task ``task``'s logits for ``x``: the representation through that task's head."""
        return self.heads[task](self(x))


class MultiHeadNet(MultiHead):
    """``backbone`` (images -> ``[N, representation_dim]``) with per-task heads, e.g. for
    ``fastl2r.register_architecture("my_cnn", lambda c, heads: MultiHeadNet(MyCNN(c), 128, heads))``."""

    def __init__(self, backbone: nn.Module, representation_dim: int, head_classes: Sequence[int] = ()):
        super().__init__()
        self.backbone = backbone
        self.representation_dim = representation_dim
        self.heads = nn.ModuleList()
        for n in head_classes:
            self.add_head(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The representation ``[N, representation_dim]``: the backbone's output, unchanged."""
        return self.backbone(x)

    @property
    def arch_name(self) -> str:
        """The backbone's class name: how messages (e.g. a meta-learner trained for another network) name this
        architecture."""
        return type(self.backbone).__name__
