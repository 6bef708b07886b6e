import pytest
import torch
import torch_pruning as tp
import torchvision
from torch import nn

from slimrarts.metrics import count_params
from slimrarts.models import PreResNet, ResNetCifar, create_model, is_model, list_models, model_info, register_model
from slimrarts.models import registry as _registry

ZOO = list_models()
TINY = list_models("tiny_*")


# ------------------------------------------------------------------ parameter counts from the layer shapes


def _bn(c: int) -> int:
    return 2 * c


def _preresnet_params(depth: int, num_classes: int, widths=(16, 32, 64)) -> int:
    blocks = (depth - 2) // 9
    total = 3 * 3 * 3 * widths[0]  # stem conv 3x3, no bias
    cin = widths[0]
    for planes in widths:
        for b in range(blocks):
            total += _bn(cin) + cin * planes  # bn1, conv1 1x1
            total += _bn(planes) + 9 * planes * planes  # bn2, conv2 3x3
            total += _bn(planes) + planes * 4 * planes  # bn3, conv3 1x1
            if b == 0:  # first block of a stage: width or stride changes, 1x1 projection without BN
                total += cin * 4 * planes
            cin = 4 * planes
    return total + _bn(cin) + cin * num_classes + num_classes


def _resnet_cifar_params(depth: int, num_classes: int, widths=(16, 32, 64)) -> int:
    blocks = (depth - 2) // 6
    total = 27 * widths[0] + _bn(widths[0])
    cin = widths[0]
    for planes in widths:
        for _ in range(blocks):
            total += 9 * cin * planes + _bn(planes) + 9 * planes * planes + _bn(planes)
            if cin != planes:  # option B projection: 1x1 conv + BN
                total += cin * planes + _bn(planes)
            cin = planes
    return total + cin * num_classes + num_classes


def _mobilenetv2_params(num_classes: int) -> int:
    setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3), (6, 320, 1)]
    total = 27 * 32 + _bn(32)
    cin = 32
    for t, c, n in setting:
        for _ in range(n):
            hidden = cin * t
            if t != 1:
                total += cin * hidden + _bn(hidden)
            total += 9 * hidden + _bn(hidden) + hidden * c + _bn(c)
            cin = c
    return total + cin * 1280 + _bn(1280) + 1280 * num_classes + num_classes


def test_preresnet164_params():
    expected = _preresnet_params(164, 10)
    assert expected == 1_703_258
    assert abs(expected - 1.70e6) / 1.70e6 < 0.01  # Network Slimming's 1.70M
    assert count_params(create_model("preresnet164")) == expected
    assert count_params(create_model("preresnet164", num_classes=100)) == _preresnet_params(164, 100)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("preresnet56", _preresnet_params(56, 10)),
        ("preresnet20", _preresnet_params(20, 10)),
        ("tiny_preresnet", _preresnet_params(20, 10, widths=(4, 8, 16))),
        ("resnet56", _resnet_cifar_params(56, 10)),
        ("resnet20", _resnet_cifar_params(20, 10)),
        ("tiny_resnet", _resnet_cifar_params(14, 10, widths=(4, 8, 16))),
        ("mobilenetv2_cifar", _mobilenetv2_params(10)),
    ],
)
def test_param_counts(name, expected):
    assert count_params(create_model(name)) == expected


def test_exact_counts():
    assert _resnet_cifar_params(56, 10) == 855_770
    assert _mobilenetv2_params(10) == 2_236_682


def test_mobilenetv2_matches_torchvision_shapes():
    # Same layers as torchvision's ImageNet MobileNetV2; only strides differ.
    ours = {k: v.shape for k, v in create_model("mobilenetv2_cifar").state_dict().items()}
    theirs = torchvision.models.mobilenet_v2(num_classes=10).state_dict()
    assert sorted(ours.values()) == sorted(v.shape for v in theirs.values())


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_are_tiny(name):
    assert count_params(create_model(name)) < 20_000


# ------------------------------------------------------------------ building and running


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_forward(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    assert isinstance(model, nn.Module)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_16px_and_backward(name):
    model = create_model(name)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_functional_call(name):
    model = create_model(name).eval()
    x = torch.randn(2, 3, 32, 32)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    state = {k: v.detach().clone() for k, v in state.items()}
    with torch.no_grad():
        torch.testing.assert_close(torch.func.functional_call(model, state, (x,)), model(x))


def test_preresnet_block_layout():
    model = create_model("preresnet164")
    block = model.layer2[0]
    assert block.conv2.stride == (2, 2) and block.downsample[0].stride == (2, 2)
    assert len(block.downsample) == 1 and isinstance(block.downsample[0], nn.Conv2d)
    assert model.layer2[1].downsample is None
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [18, 18, 18]
    assert model.bn.num_features == 256 and model.fc.in_features == 256
    assert all(bool((m.weight == 1).all()) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_mobilenetv2_width_mult():
    model = create_model("mobilenetv2_cifar", width_mult=0.5)
    assert model.conv1.out_channels == 16 and model.fc.in_features == 1280
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ZOO)
def test_dependency_graph(name):
    model = create_model(name).eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    assert list(dg.get_all_groups(root_module_types=[nn.Conv2d]))


@pytest.mark.parametrize("name", TINY)
def test_torch_pruning_prunes(name):
    model = create_model(name).eval()
    x = torch.randn(1, 3, 32, 32)
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5, ignored_layers=[model.fc]
    )
    pruner.step()
    assert count_params(model) < count_params(create_model(name))
    assert model(x).shape == (1, 10)


# ------------------------------------------------------------------ external factories


def test_timm_model():
    model = create_model("timm:resnet18", num_classes=10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_model():
    model = create_model("torchvision:resnet18", num_classes=10).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_pretrained_flag_rejected():
    with pytest.raises(ValueError, match="weights"):
        create_model("torchvision:resnet18", pretrained=True)


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("preresnet146", "'preresnet164'"),
        ("timm:resnet_18", "'timm:resnet18'"),
        ("torchvision:resnet_18", "'torchvision:resnet18'"),
        ("resnet18", "'timm:resnet18'"),
    ],
)
def test_unknown_name_suggests(name, suggestion):
    with pytest.raises(ValueError, match="list_models") as info:
        create_model(name)
    assert repr(name) in str(info.value) and suggestion in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": "foo:bar"}, ValueError),
        ({"name": 3}, TypeError),
        ({"name": "tiny_resnet", "num_classes": 0}, ValueError),
        ({"name": "tiny_resnet", "num_classes": 10.0}, TypeError),
        ({"name": "tiny_resnet", "pretrained": True}, ValueError),
        ({"name": "tiny_preresnet", "widths": (4, 0, 8)}, ValueError),
        ({"name": "tiny_mobilenetv2", "width_mult": -1.0}, ValueError),
    ],
)
def test_bad_input(kwargs, error):
    with pytest.raises(error):
        create_model(**kwargs)


@pytest.mark.parametrize("cls", [PreResNet, ResNetCifar])
def test_bad_depth(cls):
    with pytest.raises(ValueError, match="depth=15"):
        cls(depth=15)


def test_list_and_is_model():
    assert {"preresnet164", "preresnet56", "resnet56", "mobilenetv2_cifar", "tiny_preresnet"} <= set(ZOO)
    assert ZOO == sorted(ZOO)
    assert list_models("preresnet*") == ["preresnet164", "preresnet20", "preresnet56"]
    assert "timm:resnet18" in list_models("timm:resnet1*")
    assert "torchvision:resnet18" in list_models("torchvision:resnet*")
    assert is_model("resnet56") and is_model("timm:resnet18") and is_model("torchvision:resnet18")
    assert not is_model("resnet57") and not is_model("foo:bar") and not is_model("timm:nope")


def test_model_info():
    info = model_info("preresnet164")
    assert info["pre_activation"] is True and info["input_size"] == (3, 32, 32) and info["source"] == "zoo"
    assert model_info("resnet56")["pre_activation"] is False
    assert model_info("timm:resnet18")["source"] == "timm"
    info["family"] = "changed"
    assert model_info("preresnet164")["family"] == "preresnet"


def test_register_model(monkeypatch):
    monkeypatch.setattr(_registry, "_MODELS", dict(_registry._MODELS))
    monkeypatch.setattr(_registry, "_INFO", dict(_registry._INFO))

    @register_model(family="linear")
    def my_linear(num_classes: int = 10) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, num_classes))

    assert is_model("my_linear") and model_info("my_linear")["family"] == "linear"
    assert create_model("my_linear", num_classes=3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError, match="already registered"):
        register_model(my_linear)
    with pytest.raises(ValueError, match="':'"):
        register_model(name="a:b")(my_linear)
    with pytest.raises(TypeError, match="unknown metadata"):
        register_model(famliy="x")
