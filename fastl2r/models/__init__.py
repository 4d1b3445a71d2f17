"""The ResNet-GN family, multi-head networks, architectures by name, and the activation taps
the meta-learner reads."""
from .architectures import ARCHITECTURES, BUILT_IN_ARCHITECTURES, build_model, check_arch
from .heads import MultiHead, MultiHeadNet
from .resnet import BasicBlock, ResNetGN, SlotConv2d, SlotGroupNorm, resnet8_gn, resnet14_gn, resnet32_gn, runs_slots
from .taps import ActivationTaps, TappedLayer, activation_means, is_head, record_activations, tapped_layers

__all__ = ["ARCHITECTURES", "BUILT_IN_ARCHITECTURES", "build_model", "check_arch", "MultiHead", "MultiHeadNet",
           "BasicBlock", "ResNetGN", "SlotConv2d", "SlotGroupNorm", "resnet8_gn", "resnet14_gn", "resnet32_gn",
           "runs_slots", "ActivationTaps", "TappedLayer", "activation_means", "is_head", "record_activations",
           "tapped_layers"]
