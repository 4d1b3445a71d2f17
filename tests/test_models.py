"""ResNet-GN architecture (DESIGN §1.1) and the activation taps."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.func import functional_call

from fastl2r.meta.metalearner import ActivationTaps, activation_means, record_activations, tapped_layers
from fastl2r.models import ResNetGN, resnet14_gn, resnet32_gn, runs_slots


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
    layers = tapped_layers(model)
    seen = {}

    def capture(module, inputs, output):  # an independent record of the same forward
        seen[module] = (inputs[0].detach(), output.detach())

    handles = [m.register_forward_hook(capture) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    x = torch.randn(6, 3, 32, 32)
    with record_activations(model, layers) as activations:
        model(x)
    means = activation_means(layers, activations)
    modules = dict(model.named_modules())
    assert len(layers) == 2 * (1 + 2 * 3 * 2)  # convs and GroupNorms, no head
    for layer in layers:
        inp, out = seen[modules[layer.name]]
        torch.testing.assert_close(means[layer.in_offset:layer.in_offset + layer.in_channels], inp.mean((0, 2, 3)))
        torch.testing.assert_close(means[layer.out_offset:layer.out_offset + layer.out_channels], out.mean((0, 2, 3)))
    # the stem conv's input is the image itself
    torch.testing.assert_close(means[:3], x.mean((0, 2, 3)))
    for h in handles:
        h.remove()


def test_recording_leaves_no_hook_and_complains_when_nothing_ran():
    model = resnet14_gn(1, [2])
    layers = tapped_layers(model)
    with record_activations(model, layers) as activations:
        pass
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="forward pass"):
        activation_means(layers, activations)
    taps = ActivationTaps(model)  # the optimizer's taps: every forward until removed
    model(torch.randn(2, 1, 32, 32))
    assert taps.means().shape == (sum(l.in_channels + l.out_channels for l in layers),)
    taps.remove()
    assert all(not m._forward_hooks for m in model.modules())


def test_folded_slots_are_independent_networks():
    """S networks folded into one (grouped convolutions, S·groups GroupNorm, per-slot zero-padded
    shortcuts) give each slot's representation and activation means exactly as its own network."""
    torch.manual_seed(0)
    slots = 3
    nets = [resnet14_gn(2, [3]).double() for _ in range(slots)]
    for net in nets:
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.GroupNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
    xs = [torch.randn(4, 2, 32, 32, dtype=torch.float64) for _ in range(slots)]
    skeleton = nets[0]
    folded = {name: torch.cat([dict(net.named_parameters())[name] for net in nets])
              for name, _ in skeleton.named_parameters() if not name.startswith("heads")}
    layers = tapped_layers(skeleton)
    assert runs_slots(skeleton)
    with record_activations(skeleton, layers) as activations:
        h = functional_call(skeleton, folded, (torch.cat(xs, dim=1),))
    means = activation_means(layers, activations)
    for s, (net, x) in enumerate(zip(nets, xs)):
        torch.testing.assert_close(h.view(4, slots, 64)[:, s], net(x), rtol=1e-12, atol=1e-12)
        with record_activations(net, layers) as own:
            net(x)
        own_means = activation_means(layers, own)
        for layer in layers:  # a layer's S·C means, slot by slot
            for offset, channels in ((layer.in_offset, layer.in_channels), (layer.out_offset, layer.out_channels)):
                start = slots * offset + s * channels
                torch.testing.assert_close(means[start:start + channels], own_means[offset:offset + channels])


def test_plain_layers_run_one_slot_only():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4))
    assert not runs_slots(net) and runs_slots(resnet14_gn(1, [2]))
