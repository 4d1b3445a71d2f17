"""CIFAR ResNets of He et al. (2016) with GroupNorm, multi-head (DESIGN §1.1).

``model(x)`` returns the 64-d representation ``h``; ``model.heads[t](h)`` gives the
logits of task ``t``.  Shortcuts are parameter-free: subsample, then zero-pad the
new channels (option A of the paper).

**Episode slots folded into channels.**  The layers run S independent networks at
once when their weights and inputs are folded (DESIGN §6): an input ``[N, S·C, H, W]``
holds slot s's images in channels ``s·C … s·C + C − 1``, a conv weight is
``[S·C_out, C_in, k, k]`` (a grouped convolution, one group per slot), a GroupNorm's
γ and β are ``[S·C]`` (its groups never straddle two slots), and ``h`` is
``[N, S·64]``.  S is read from the input's channel count, so the same modules serve
one network (S = 1, the usual shapes) and ``torch.func.functional_call`` with folded
weights; activations seen by forward hooks are folded too.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import MultiHead

CHANNELS_PER_GROUP = 4  # GroupNorm groups of 4 channels (ours)
WIDTHS = (16, 32, 64)


def slots_of(x: torch.Tensor, channels: int) -> int:
    """How many slots a folded activation ``[N, S·channels, ...]`` holds."""
    if x.shape[1] % channels:
        raise ValueError(f"an input of {x.shape[1]} channels is not a whole number of slots of {channels}")
    return x.shape[1] // channels


class SlotConv2d(nn.Conv2d):
    """``nn.Conv2d`` that also runs S folded slots, as a convolution of S groups."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ``[N, S·C_in, H, W]`` as S independent networks (S read from its channels); S = 1 is
        ``nn.Conv2d``."""
        slots = slots_of(x, self.in_channels)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, slots)


class SlotGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that also runs S folded slots (S times the groups, γ and β ``[S·C]``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``[N, S·C, ...]`` with S times the groups, so that no group straddles two slots;
        S = 1 is ``nn.GroupNorm``."""
        slots = slots_of(x, self.num_channels)
        return F.group_norm(x, self.num_groups * slots, self.weight, self.bias, self.eps)


def group_norm(channels: int) -> SlotGroupNorm:
    """The family's GroupNorm over ``channels``: groups of 4 channels (§1.1), slot-aware."""
    return SlotGroupNorm(channels // CHANNELS_PER_GROUP, channels)


class BasicBlock(nn.Module):
    """He et al.'s residual block (two 3×3 convs) with GroupNorm and a parameter-free shortcut, slot-aware
    (§1.1)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = SlotConv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.gn1 = group_norm(out_channels)
        self.conv2 = SlotConv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.gn2 = group_norm(out_channels)
        self.stride = stride
        self.in_channels = in_channels
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(gn2(conv2(relu(gn1(conv1(x))))) + shortcut)``, the shortcut subsampled by the stride and
        zero-padded to the new width within each slot."""
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra_channels:  # zero channels appended to each slot's own
            n, _, height, width = shortcut.shape
            slots = slots_of(x, self.in_channels)
            shortcut = F.pad(shortcut.view(n, slots, self.in_channels, height, width),
                             (0, 0, 0, 0, 0, self.extra_channels)).view(n, -1, height, width)
        return F.relu(out + shortcut)


class ResNetGN(MultiHead):
    """3 stages of ``blocks_per_stage`` BasicBlocks at widths 16/32/64; depth = 6n + 2."""

    representation_dim = WIDTHS[-1]

    def __init__(self, blocks_per_stage: int, in_channels: int = 3, head_classes: Sequence[int] = ()):
        super().__init__()
        self.blocks_per_stage = blocks_per_stage
        self.in_channels = in_channels
        self.conv = SlotConv2d(in_channels, WIDTHS[0], 3, 1, 1, bias=False)
        self.gn = group_norm(WIDTHS[0])
        blocks, width = [], WIDTHS[0]
        for stage, out_width in enumerate(WIDTHS):
            for b in range(blocks_per_stage):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(BasicBlock(width, out_width, stride))
                width = out_width
        self.blocks = nn.Sequential(*blocks)
        self.heads = nn.ModuleList()
        for n in head_classes:
            self.add_head(n)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The representation ``h`` [N, 64] (folded: [N, S·64]): global average pool of the last stage."""
        out = F.relu(self.gn(self.conv(x)))
        out = self.blocks(out)
        return out.mean(dim=(2, 3))

    @property
    def depth(self) -> int:
        """Layers as He et al. count them (6n + 2): the number in the architecture's name."""
        return 6 * self.blocks_per_stage + 2

    @property
    def arch_name(self) -> str:
        """``resnet<depth>_gn``: this network's name in ``ARCHITECTURES`` and in messages."""
        return f"resnet{self.depth}_gn"


def resnet32_gn(in_channels: int = 3, head_classes: Sequence[int] = ()) -> ResNetGN:
    """The paper's network (n = 5 blocks per stage, §1.1), for Experiments 1–4."""
    return ResNetGN(5, in_channels, head_classes)


def resnet14_gn(in_channels: int = 3, head_classes: Sequence[int] = ()) -> ResNetGN:
    """The paper's smaller network (n = 2), for Experiment 5."""
    return ResNetGN(2, in_channels, head_classes)


def resnet8_gn(in_channels: int = 3, head_classes: Sequence[int] = ()) -> ResNetGN:
    """One block per stage: not in the paper; for tests and fast trials (``--set arch=resnet8_gn``)."""
    return ResNetGN(1, in_channels, head_classes)


def runs_slots(model: nn.Module, head_prefix: str = "heads") -> bool:
    """Can ``model`` run several folded episode slots at once?  Only if every layer with
    parameters (heads aside) folds them, as the ``Slot`` layers here do; any network runs one."""
    return all(isinstance(m, (SlotConv2d, SlotGroupNorm)) or next(m.parameters(recurse=False), None) is None
               for name, m in model.named_modules()
               if name != head_prefix and not name.startswith(head_prefix + "."))
