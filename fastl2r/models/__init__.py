"""The ResNet-GN family (with the Slot layers that fold episode slots), multi-head networks and
architectures by name."""
from .architectures import ARCHITECTURES, BUILT_IN_ARCHITECTURES, build_model, check_arch
from .heads import MultiHead, MultiHeadNet
from .resnet import BasicBlock, ResNetGN, SlotConv2d, SlotGroupNorm, resnet8_gn, resnet14_gn, resnet32_gn, runs_slots

__all__ = ["ARCHITECTURES", "BUILT_IN_ARCHITECTURES", "build_model", "check_arch", "MultiHead", "MultiHeadNet",
           "BasicBlock", "ResNetGN", "SlotConv2d", "SlotGroupNorm", "resnet8_gn", "resnet14_gn", "resnet32_gn",
           "runs_slots"]
