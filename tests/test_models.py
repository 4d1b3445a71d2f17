"""ResNet-GN architecture (DESIGN §1.1) and the activation taps."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastl2r.models import ActivationTaps, ResNetGN, resnet14_gn, resnet32_gn


def hand_count(n: int, in_channels: int, classes: int) -> int:
    """Parameters of the CIFAR ResNet with GroupNorm, counted from the architecture."""
    conv = lambda cin, cout: cin * cout * 9  # 3x3, no bias
    gn = lambda c: 2 * c                     # γ and β
    total = conv(in_channels, 16) + gn(16)
    width = 16
    for out in (16, 32, 64):
        for _ in range(n):
            total += conv(width, out) + gn(out) + conv(out, out) + gn(out)
            width = out
    return total + 64 * classes + classes


@pytest.mark.parametrize("factory,n", [(resnet32_gn, 5), (resnet14_gn, 2)])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_parameter_count_matches_hand_count(factory, n, in_channels):
    model = factory(in_channels, [5])
    assert sum(p.numel() for p in model.parameters()) == hand_count(n, in_channels, 5)
    assert model.depth == 6 * n + 2


def test_resnet32_has_the_papers_layers():
    model = resnet32_gn(3, [5])
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(convs) == 31 and len(norms) == 31
    assert all(m.kernel_size == (3, 3) and m.bias is None for m in convs)
    assert all(m.num_channels // m.num_groups == 4 for m in norms)  # 4 channels per group


def test_representation_is_64d_and_heads_are_per_task():
    model = resnet14_gn(1, [2, 3])
    x = torch.randn(4, 1, 32, 32)
    h = model(x)
    assert h.shape == (4, 64)
    assert model.logits(x, 1).shape == (4, 3)
    assert model.add_head(7) == 2 and model.heads[2](h).shape == (4, 7)


def test_block_shortcut_subsamples_and_zero_pads_channels():
    torch.manual_seed(0)
    block = ResNetGN(1, 3).blocks[1]  # 16 -> 32, stride 2
    x = torch.randn(2, 16, 8, 8)
    residual = block.gn2(block.conv2(F.relu(block.gn1(block.conv1(x)))))
    shortcut = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], dim=1)
    torch.testing.assert_close(block(x), F.relu(residual + shortcut))


def test_taps_record_every_layer_mean_in_one_forward():
    torch.manual_seed(0)
    model = resnet14_gn(3, [5])
    taps = ActivationTaps(model)
    seen = {}

    def capture(module, inputs, output):  # an independent record of the same forward
        seen[module] = (inputs[0].detach(), output.detach())

    handles = [m.register_forward_hook(capture) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    x = torch.randn(6, 3, 32, 32)
    with taps.record():
        model(x)
    means = taps.means()
    modules = dict(model.named_modules())
    assert len(taps.layers) == 2 * (1 + 2 * 3 * 2)  # convs and GroupNorms, no head
    for layer in taps.layers:
        inp, out = seen[modules[layer.name]]
        torch.testing.assert_close(means[layer.in_offset:layer.in_offset + layer.in_channels], inp.mean((0, 2, 3)))
        torch.testing.assert_close(means[layer.out_offset:layer.out_offset + layer.out_channels], out.mean((0, 2, 3)))
    # the stem conv's input is the image itself
    torch.testing.assert_close(means[:3], x.mean((0, 2, 3)))
    for h in handles:
        h.remove()


def test_taps_record_only_inside_the_block_and_complain_when_empty():
    model = resnet14_gn(1, [2])
    taps = ActivationTaps(model)
    model(torch.randn(2, 1, 32, 32))
    with pytest.raises(RuntimeError, match="taps.record"):
        taps.means()
