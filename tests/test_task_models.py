"""Width search on segmentation and detection models (issue 24): torchvision's FrozenBatchNorm2d as a norm, traces
that end at a detection model's raw heads, and the removal check on named submodules' outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from conftest import calibrated_bn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from slimrarts.errors import InputError
from slimrarts.metrics import macs_and_params
from slimrarts.width import (
    CoverageWarning,
    attach_gates,
    build_cost_model,
    freeze_batchnorm,
    layer_widths,
    raw_output_modules,
    remove_channels,
)
from slimrarts.width.norms import FrozenNormPruner


def _frozen(c: int) -> FrozenBatchNorm2d:
    """A frozen norm with statistics and affine values far from the identity."""
    m = FrozenBatchNorm2d(c)
    m.weight.uniform_(0.5, 1.5)
    m.bias.uniform_(-0.5, 0.5)
    m.running_mean.uniform_(-0.5, 0.5)
    m.running_var.uniform_(0.5, 2.0)
    return m


def _tiny_frozen_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), _frozen(8), nn.ReLU(), nn.Conv2d(8, 6, 3, bias=False),
                         _frozen(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()


def _random_alphas(gates, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape, generator=g) * 1.4 + 0.1)


def _random_keep(gates, seed: int = 2, share: float = 0.5) -> list[torch.Tensor]:
    """Random keep masks over each group's α entries, each keeping at least one and cutting at least one."""
    g = torch.Generator().manual_seed(seed)
    keep = []
    for group in gates.groups:
        n = group.num_alphas
        k = torch.rand(n, generator=g) < share
        k[torch.randint(n, (1,), generator=g)] = True
        if k.all() and n > 1:
            k[torch.randint(n, (1,), generator=g)] = False
        keep.append(k)
    return keep


def test_frozen_norm_is_the_gate_site_and_the_cut_slices_its_buffers():
    net = _tiny_frozen_net()
    x = torch.randn(2, 3, 16, 16)
    gates = attach_gates(net, x)
    assert [(g.root, [(s.module, s.fold) for s in g.sites]) for g in gates.groups] == [
        ("0", [("1", "norm")]), ("3", [("4", "norm")])]
    assert not gates.skipped
    _random_alphas(gates)
    keep = [torch.tensor([1, 0, 1, 1, 0, 1, 1, 0]).bool(), torch.tensor([1, 1, 0, 0, 1, 0]).bool()]
    gamma = net[1].weight.clone() * gates.alphas[0].detach()
    beta, mean = net[1].bias.clone() * gates.alphas[0].detach(), net[1].running_mean.clone()
    with torch.no_grad():
        dense = net(x)
    spec = remove_channels(gates, keep, check_input=x)
    assert spec["max_abs_diff"] <= 1e-5 * spec["max_abs_ref"]
    assert (dense - net(x)).abs().max() > 1e-3  # the masks changed the output: the check compared something
    kept = keep[0]
    # α folded into the frozen scale and shift, then every per-channel buffer sliced to the kept channels
    torch.testing.assert_close(net[1].weight, gamma[kept])
    torch.testing.assert_close(net[1].bias, beta[kept])
    torch.testing.assert_close(net[1].running_mean, mean[kept])
    assert dict(net[1].named_buffers()).keys() == {"weight", "bias", "running_mean", "running_var"}
    assert net[1].running_var.shape == (5,) and net[0].out_channels == 5 and net[3].in_channels == 5
    assert layer_widths(net)["4"] == [3, 3] and net[8].in_features == 3


def test_frozen_norm_pruner_keeps_the_other_channels_in_order():
    norm = _frozen(5)
    before = {k: v.clone() for k, v in norm.named_buffers()}
    FrozenNormPruner().prune_out_channels(norm, [3, 1])
    for name, value in norm.named_buffers():
        torch.testing.assert_close(value, before[name][[0, 2, 4]])
    assert FrozenNormPruner().get_in_channels(norm) == 3


def test_cost_model_counts_frozen_norms_as_the_cut_model_does():
    net = _tiny_frozen_net()
    as_bn = nn.Sequential(*[nn.BatchNorm2d(m.weight.shape[0]) if isinstance(m, FrozenBatchNorm2d) else m
                            for m in net]).eval()
    dense = macs_and_params(net, (1, 3, 16, 16))
    assert dense[0] == macs_and_params(as_bn, (1, 3, 16, 16))[0]  # MACs of an affine BatchNorm (not 0)
    gates = attach_gates(net, torch.randn(1, 3, 16, 16))
    cm = build_cost_model(gates)
    assert cm.dense == dense
    keep = [torch.tensor([1, 0, 1, 1, 0, 1, 1, 0]).bool(), torch.tensor([1, 1, 0, 0, 1, 0]).bool()]
    predicted = cm(keep)
    remove_channels(gates, keep)
    assert predicted == macs_and_params(net, (1, 3, 16, 16)) and predicted[0] < dense[0]


def test_freeze_batchnorm_swaps_every_bn_and_keeps_the_function():
    model = calibrated_bn(torchvision.models.resnet18(weights=None, num_classes=10), size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert freeze_batchnorm(model) is model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == n_bn == 20
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


def test_resnet18_with_frozen_norms_is_gated_and_cut_exactly():
    model = freeze_batchnorm(calibrated_bn(torchvision.models.resnet18(weights=None, num_classes=10), size=32))
    x = torch.randn(2, 3, 32, 32)
    gates = attach_gates(model, x[:1], ("internal", "coupled"))
    assert not gates.skipped
    sites = {s.module for g in gates.groups for s in g.sites}
    assert "bn1" in sites and "layer1.0.bn1" in sites and "layer4.1.bn2" in sites  # frozen norms carry the gates
    assert all(isinstance(model.get_submodule(s), FrozenBatchNorm2d) for s in sites)
    _random_alphas(gates)
    spec = remove_channels(gates, _random_keep(gates), check_input=x)
    assert spec["max_abs_diff"] <= 1e-4 * max(1.0, spec["max_abs_ref"])
    assert model.layer1[0].bn1.weight.shape[0] == model.layer1[0].conv1.out_channels < 64


class _TwoHeads(nn.Module):
    """Features, then a head whose output is kept and one whose output goes through a data-dependent selection."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        raw = self.head(self.body(x))
        return {"raw": raw, "top": raw.flatten(1).topk(3).indices}


def test_check_modules_compares_the_named_submodules_outputs():
    model = calibrated_bn(_TwoHeads(), size=8)
    x = torch.randn(2, 3, 8, 8)
    gates = attach_gates(model, x, outputs=["head"])
    assert gates.outputs == ["head"] and len(gates.groups) == 2
    _random_alphas(gates)
    keep = _random_keep(gates)
    with torch.no_grad(), gates.masked(keep):
        ref = model.head(model.body(x))
    spec = remove_channels(gates, keep, check_input=x, check_modules=["head"])
    assert spec["max_abs_diff_by_module"].keys() == {"head"}
    assert spec["max_abs_ref"] == pytest.approx(ref.abs().max().item())  # the head's output, not the indices
    assert spec["max_abs_diff"] <= 1e-5 * spec["max_abs_ref"]
    assert spec["outputs"] == ["head"]


def test_check_modules_names_the_model_with_the_empty_string_and_default_compares_every_output():
    model = calibrated_bn(_TwoHeads(), size=8)
    x = torch.randn(2, 3, 8, 8)
    gates = attach_gates(model, x)
    keep = _random_keep(gates)
    with torch.no_grad(), gates.masked(keep):
        top = model(x)["top"]
    spec = remove_channels(gates, keep, check_input=x, check_modules=[""])
    assert spec["max_abs_diff_by_module"].keys() == {""}
    assert spec["max_abs_ref"] >= top.max().item()  # the indices of the model's dict output were compared too
    fresh = attach_gates(calibrated_bn(_TwoHeads(), size=8), x)  # the first model is cut now
    assert "max_abs_diff_by_module" not in remove_channels(fresh, [torch.ones(g.num_alphas).bool()
                                                                   for g in fresh.groups], check_input=x)


def test_check_modules_bad_names_and_cut_widths_are_refused():
    model = calibrated_bn(_TwoHeads(), size=8)
    x = torch.randn(2, 3, 8, 8)
    gates = attach_gates(model, x)
    with pytest.raises(InputError, match="'neck' is not a submodule"):
        remove_channels(gates, _random_keep(gates), check_input=x, check_modules=["neck"])
    with pytest.raises(InputError, match="list of submodule names"):
        remove_channels(gates, _random_keep(gates), check_input=x, check_modules="head")
    assert model.body[0].out_channels == 8  # refused before anything was cut
    with pytest.raises(RuntimeError, match="shapes"):  # the first conv's outputs are cut: they cannot line up
        remove_channels(gates, _random_keep(gates), check_input=x, check_modules=["body.0"])


class _Predictions(nn.Module):
    """A detection-style head: its conv's channels are anchors × values, viewed and concatenated into the output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pred = nn.Conv2d(8, 12, 1)

    def forward(self, x):
        p = self.pred(self.body(x))
        n, _, h, w = p.shape
        return torch.cat([p.view(n, 3, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4), torch.zeros(n, 1, 4)], 1)


def test_prediction_channels_reaching_the_output_are_neither_gated_nor_skipped():
    model = calibrated_bn(_Predictions(), size=8)
    gates = attach_gates(model, torch.randn(1, 3, 8, 8))
    assert [g.root for g in gates.groups] == ["body.0"]
    assert not gates.skipped and not gates.out_of_scope


class _Decoder(nn.Module):
    """Upsampling (F.interpolate) between two gated layers, and a flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6 * 8 * 8, 3)

    def forward(self, x):
        y = F.interpolate(self.a(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.fc(self.b(y).flatten(1))


def test_interpolate_and_flatten_into_a_linear_layer_are_cut_exactly():
    model = calibrated_bn(_Decoder(), size=8)
    x = torch.randn(2, 3, 8, 8)
    gates = attach_gates(model, x)
    assert [g.root for g in gates.groups] == ["a.0", "b.0"] and not gates.skipped
    _random_alphas(gates)
    keep = _random_keep(gates)
    spec = remove_channels(gates, keep, check_input=x)
    assert spec["max_abs_diff"] <= 1e-5 * spec["max_abs_ref"]
    assert model.fc.in_features == int(keep[1].sum()) * 64


class _TinyBackbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), _frozen(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), _frozen(16), nn.ReLU())
        self.out_channels = 16


def _tiny_faster_rcnn() -> FasterRCNN:
    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((16, 32),), aspect_ratios=((0.5, 1.0, 2.0),))
    pool = MultiScaleRoIAlign(["0"], output_size=4, sampling_ratio=2)
    return FasterRCNN(_TinyBackbone(), rpn_anchor_generator=anchors, box_roi_pool=pool,
                      box_head=TwoMLPHead(16 * 4 * 4, 32), box_predictor=FastRCNNPredictor(32, 3), min_size=64,
                      max_size=64, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20,
                      box_detections_per_img=10).eval()


def test_raw_output_modules_name_the_heads_of_detection_models_only():
    assert raw_output_modules(_tiny_faster_rcnn()) == ["rpn.head", "roi_heads.box_predictor"]
    ssd = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None,
                                       num_classes=3)
    assert raw_output_modules(ssd) == ["head"]
    assert raw_output_modules(torchvision.models.resnet18(weights=None)) == []
    seg = torchvision.models.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None)
    assert raw_output_modules(seg) == []


def test_tiny_faster_rcnn_is_gated_and_cut_exactly_on_its_raw_heads():
    model = _tiny_faster_rcnn()
    x = torch.rand(1, 3, 64, 64)
    gates = attach_gates(model, x, ("internal", "coupled"))
    assert gates.outputs == ["rpn.head", "roi_heads.box_predictor"]
    roots = [g.root for g in gates.groups]
    # the backbone's output reaches the box head through RoIAlign pooling and a flatten; the predictions are outputs
    assert roots == ["backbone.0", "backbone.3", "rpn.head.conv.0.0", "roi_heads.box_head.fc6",
                     "roi_heads.box_head.fc7"]
    assert not gates.skipped
    _random_alphas(gates)
    keep = _random_keep(gates)
    spec = remove_channels(gates, keep, check_input=x, check_modules=raw_output_modules(model))
    assert spec["max_abs_diff_by_module"].keys() == {"rpn.head", "roi_heads.box_predictor"}
    assert spec["max_abs_diff"] <= 1e-5 * spec["max_abs_ref"]
    assert model.backbone[3].out_channels == model.backbone[4].weight.shape[0] == int(keep[1].sum()) < 16
    assert model.roi_heads.box_head.fc6.in_features == int(keep[1].sum()) * 16
    with torch.no_grad():
        detections = model(x)
    assert isinstance(detections, list) and detections[0].keys() == {"boxes", "labels", "scores"}


# the six torchvision models of issue 24 (weights=None); benchmarks/task_coverage.py measures the same six (RESULTS:
# "Coverage of segmentation and detection models")
TASK_MODELS = [
    ("lraspp_mobilenet_v3_large", 224, {}),
    ("deeplabv3_mobilenet_v3_large", 224, {"aux_loss": True}),
    ("fcn_resnet50", 224, {"aux_loss": True}),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", 320, {}),
    ("retinanet_resnet50_fpn", 320, {"min_size": 320, "max_size": 320}),
    ("ssdlite320_mobilenet_v3_large", 320, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, size, kwargs", TASK_MODELS, ids=[m[0] for m in TASK_MODELS])
def test_torchvision_task_models_with_frozen_norms_are_cut_exactly(name, size, kwargs):
    """Gated with FrozenBatchNorm2d in the backbone, cut at random to at least one channel per group; the slim
    model's raw predictions (detection) or outputs (segmentation, 'out' and 'aux') equal the masked gated model's."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    calibrated_bn(model.backbone, size)
    freeze_batchnorm(model.backbone)
    model.eval()
    x = torch.rand(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        gates = attach_gates(model, x, ("internal", "coupled"))
    assert len(gates.groups) > 20 and all(s.reason for s in gates.skipped)
    frozen_sites = [s for g in gates.groups for s in g.sites
                    if isinstance(model.get_submodule(s.module), FrozenBatchNorm2d)]
    assert frozen_sites and all(s.fold == "norm" for s in frozen_sites)
    _random_alphas(gates)
    check = raw_output_modules(model) or None
    assert (check is None) == name.startswith(("lraspp", "deeplab", "fcn"))
    before = layer_widths(model)
    spec = remove_channels(gates, _random_keep(gates), check_input=x, check_modules=check)
    assert spec["max_abs_diff"] <= 1e-4 * max(1e-3, spec["max_abs_ref"]), spec["max_abs_diff"]
    after = layer_widths(model)
    assert sum(w[1] for w in after.values()) < sum(w[1] for w in before.values())
    with torch.no_grad():
        model(x)  # the slim model still runs end to end (post-processing included)
