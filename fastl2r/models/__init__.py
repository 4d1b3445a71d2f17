"""The ResNet-GN family and the activation taps the meta-learner reads."""
from .resnet import ARCHITECTURES, BasicBlock, ResNetGN, resnet8_gn, resnet14_gn, resnet32_gn
from .taps import ActivationTaps, TappedLayer, is_head, tapped_layers

__all__ = ["ARCHITECTURES", "BasicBlock", "ResNetGN", "resnet8_gn", "resnet14_gn", "resnet32_gn",
           "ActivationTaps", "TappedLayer", "is_head", "tapped_layers"]
