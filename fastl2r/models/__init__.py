"""The ResNet-GN family and the activation taps the meta-learner reads."""
from .resnet import (ARCHITECTURES, BasicBlock, ResNetGN, SlotConv2d, SlotGroupNorm, resnet8_gn, resnet14_gn,
                     resnet32_gn, runs_slots)
from .taps import (ActivationTaps, TappedLayer, activation_means, is_head, record_activations, tapped_layers)

__all__ = ["ARCHITECTURES", "BasicBlock", "ResNetGN", "SlotConv2d", "SlotGroupNorm", "resnet8_gn", "resnet14_gn",
           "resnet32_gn", "runs_slots", "ActivationTaps", "TappedLayer", "activation_means", "is_head",
           "record_activations", "tapped_layers"]
