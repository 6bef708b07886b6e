import copy

import pytest
import torch
from torch import nn

from slimrarts.metrics import count_macs, count_params, format_count, macs_and_params, measure_latency
from slimrarts.models import create_model


@pytest.mark.parametrize(
    ("conv", "hw"),
    [
        (nn.Conv2d(3, 8, 3, padding=1, bias=False), 32),
        (nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=True), 32),
        (nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), 16),
    ],
)
def test_conv_macs_hand_formula(conv, hw):
    out = (hw + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
    k = conv.kernel_size[0] * conv.kernel_size[1]
    expected = k * (conv.in_channels // conv.groups) * conv.out_channels * out * out
    expected += conv.out_channels * out * out if conv.bias is not None else 0  # torch-pruning counts bias adds
    assert count_macs(conv, (1, conv.in_channels, hw, hw)) == expected


def test_linear_macs():
    assert count_macs(nn.Linear(20, 5, bias=False), (1, 20)) == 100


def test_count_params():
    model = create_model("tiny_preresnet")
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    model.fc.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - model.fc.weight.numel() - 10


def test_shared_parameters_counted_once():
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, lin)) == 20


def test_macs_of_a_small_net_by_hand():
    """Every term written out: conv k²·c_in·c_out·H·W (+ a bias add per output), BN 2 per element (affine), ReLU and
    pools 1 per element (of the input for pools), linear in·out + out."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, stride=2, bias=True), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    macs = (9 * 3 * 8 * 16 * 16  # conv 3→8 at 16x16
            + 2 * 8 * 16 * 16 + 8 * 16 * 16  # BN, ReLU
            + 8 * 16 * 16  # max pool (its input)
            + 9 * 8 * 4 * 3 * 3 + 4 * 3 * 3  # conv 8→4, stride 2 on 8x8 without padding: 3x3 outputs, bias
            + 4 * 3 * 3 + 4 * 3 * 3  # ReLU, average pool (its input)
            + 4 * 5 + 5)  # linear with bias
    params = 3 * 8 * 9 + 2 * 8 + 8 * 4 * 9 + 4 + 4 * 5 + 5
    assert macs_and_params(model, (1, 3, 16, 16)) == (macs, params)


def _macs_by_convention(model: nn.Module, x: torch.Tensor) -> int:
    """An independent count of the documented convention, module by module, from the shapes each call sees."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        inp = inputs[0]
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            total += k * (m.in_channels // m.groups) * m.out_channels * out[0, 0].numel()
            total += out[0].numel() if m.bias is not None else 0
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
        elif isinstance(m, nn.BatchNorm2d):
            total += inp[0].numel() * (2 if m.affine else 1)
        elif isinstance(m, (nn.ReLU, nn.ReLU6)):
            total += out[0].numel()
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d)):
            total += inp[0].numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["tiny_preresnet", "tiny_resnet", "tiny_mobilenetv2"])
def test_macs_follow_the_convention_and_leave_model_alone(name):
    model = create_model(name).train()
    model.fc.eval()
    before = copy.deepcopy(model.state_dict())
    macs, params = macs_and_params(model)
    assert params == sum(p.numel() for p in model.parameters())
    assert macs == _macs_by_convention(copy.deepcopy(model), torch.randn(1, 3, 32, 32))
    assert model.training and not model.fc.training
    assert not model._forward_hooks and not any(m._forward_hooks for m in model.modules())
    assert "__batch_counter__" not in model.__dict__ and "start_flops_count" not in model.__dict__
    for key, value in model.state_dict().items():  # eval mode: BN running stats untouched
        torch.testing.assert_close(value, before[key])


def test_macs_example_inputs():
    model = create_model("tiny_resnet")
    assert count_macs(model, example_inputs=torch.randn(1, 3, 32, 32)) == count_macs(model)
    assert count_macs(model, (1, 3, 16, 16)) < count_macs(model)


def test_latency():
    model = create_model("tiny_resnet").train()
    result = measure_latency(model, (3, 16, 16), batch_sizes=(1, 4), warmup=1, repeats=3)
    assert set(result) == {1, 4}
    for stats in result.values():
        assert 0 < stats["p10_s"] <= stats["median_s"] <= stats["p90_s"]
        assert stats["images_per_s"] > 0
    assert model.training


def test_latency_converted_copy_leaves_model_alone():
    model = create_model("tiny_resnet")
    result = measure_latency(model, batch_sizes=(2,), warmup=0, repeats=2, channels_last=True, dtype=torch.bfloat16)
    assert result[2]["median_s"] > 0
    assert model.conv1.weight.dtype == torch.float32
    assert model.conv1.weight.is_contiguous()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input_size": (1, 3, 32, 32)}, ValueError),
        ({"batch_sizes": (0,)}, ValueError),
        ({"repeats": 0}, ValueError),
        ({"warmup": -1}, ValueError),
        ({"dtype": torch.int8}, TypeError),
    ],
)
def test_latency_bad_input(kwargs, error):
    with pytest.raises(error):
        measure_latency(nn.Linear(2, 2), **kwargs)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        count_params("resnet56")
    with pytest.raises(ValueError, match="input_size"):
        count_macs(nn.Conv2d(3, 3, 1), (1, 3, -2, 2))


@pytest.mark.parametrize(
    ("n", "text"), [(1_703_258, "1.70M"), (253_160_000, "253.16M"), (999, "999"), (12_500, "12.50K"), (2.5e9, "2.50G")]
)
def test_format_count(n, text):
    assert format_count(n) == text


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_latency_cuda():
    model = create_model("tiny_preresnet").cuda()
    result = measure_latency(model, batch_sizes=(1, 8), warmup=2, repeats=5)
    assert all(stats["median_s"] > 0 for stats in result.values())
    result = measure_latency(model, batch_sizes=(8,), warmup=2, repeats=5, channels_last=True, dtype=torch.bfloat16)
    assert result[8]["median_s"] > 0
    assert count_macs(model) == count_macs(model.cpu())
