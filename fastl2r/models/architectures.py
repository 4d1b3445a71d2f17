"""Architectures by name: the built-in ResNet-GN family and those registered with
``fastl2r.register_architecture`` (DESIGN §7.2)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

from ..errors import UserError
from .resnet import resnet8_gn, resnet14_gn, resnet32_gn

# name -> factory(in_channels, head_classes) -> a multi-head network (see ``heads``)
ARCHITECTURES: dict[str, Callable[[int, Sequence[int]], nn.Module]] = {
    "resnet32_gn": resnet32_gn, "resnet14_gn": resnet14_gn, "resnet8_gn": resnet8_gn}
BUILT_IN_ARCHITECTURES = tuple(ARCHITECTURES)


def check_arch(arch: str) -> None:
    """Fail early, listing the choices, when ``arch`` names no built-in or registered architecture."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHITECTURES)} (or register your own "
                        "with fastl2r.register_architecture, e.g. in a --plugin module)")


def build_model(arch: str, in_channels: int, head_classes: Sequence[int] = ()) -> nn.Module:
    """A fresh network of architecture ``arch`` for ``in_channels``-channel images, with a head per
    entry of ``head_classes``; checks that it has the multi-head interface."""
    check_arch(arch)
    model = ARCHITECTURES[arch](in_channels, list(head_classes))
    missing = [name for name in ("heads", "add_head") if not hasattr(model, name)]
    if missing:
        raise UserError(f"architecture {arch!r} built a {type(model).__name__} without {' and '.join(missing)}: "
                        "wrap its backbone in fastl2r.models.MultiHeadNet(backbone, representation_dim, head_classes)")
    return model
