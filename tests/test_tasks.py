"""Tasks beyond classification (`slimrarts.engine.task`): segmentation and a user's loss and metric, through every
phase of prune()."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slimrarts
from slimrarts.api import finetune, prepare, recalibrate, remove, resolve_task, search, select
from slimrarts.engine import evaluate
from slimrarts.engine.task import Classification, CustomTask, Segmentation, get_task
from slimrarts.errors import DataError, InputError
from slimrarts.methods import get_method, list_methods
from slimrarts.recipe import load_recipe

TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal"], "recalibrate": 2}}
CLASSES = 4


class TinySeg(nn.Module):
    """conv-bn-relu ×2 and a 1×1 classifier, returning torchvision's dict (`out`, and `aux` from the middle)."""

    def __init__(self, classes: int = CLASSES, aux: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)
        self.aux = nn.Conv2d(8, classes, 1) if aux else None

    def forward(self, x):
        f = self.body(x)
        out = {"out": self.head(f)}
        if self.aux is not None:
            out["aux"] = self.aux(f)
        return out


def _seg_set(n: int, seed: int, size: int = 12) -> TensorDataset:
    """Masks that follow the image (class = sign of channels 0 and 1) with a border of ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    mask = ((x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long())
    mask[:, 0, :] = 255
    return TensorDataset(x, mask)


def _seg_loaders(n_train: int = 48, n_test: int = 16):
    return (DataLoader(_seg_set(n_train, 0), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0)),
            DataLoader(_seg_set(n_test, 1), batch_size=8))


def test_segmentation_end_to_end_through_prune(tmp_path):
    """Search, cut, fine-tune and report with mIoU: the slim model is smaller and its metrics are the task's."""
    torch.manual_seed(0)
    result = slimrarts.prune(TinySeg(), _seg_loaders(), 0.3, task="segmentation", config=TINY, progress=False,
                             run_dir=tmp_path / "run")
    rep = result.report
    assert rep["task"]["name"] == "segmentation" and rep["task"]["metric"] == "miou"
    assert set(rep["task"]["test"]) >= {"miou", "pixel_acc", "loss"}
    assert rep["macs"]["after"] < rep["macs"]["before"]
    for stage in ("dense", "searched", "masked", "slim_stale_bn", "slim_before_finetune", "slim_after_finetune"):
        assert 0.0 <= rep["accuracy"][stage] <= 1.0, stage
    # the report's final mIoU is that of the returned model on the test set
    again = evaluate(result.model, _seg_loaders()[1], task=Segmentation())
    assert again["miou"] == pytest.approx(rep["accuracy"]["slim_after_finetune"], abs=1e-6)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("test_miou" in r for r in lines) and any("train_pixel_acc" in r for r in lines)


def test_segmentation_ignore_index_reaches_the_loss():
    """Pixels at the ignore index add nothing to the loss or the metrics; the aux head adds aux_weight × its loss."""
    torch.manual_seed(0)
    out = {"out": torch.randn(2, 3, 4, 4), "aux": torch.randn(2, 3, 4, 4)}
    mask = torch.full((2, 4, 4), 255)
    mask[0, 1, 2] = 1
    seg = Segmentation(aux_weight=0.0)
    expected = F.cross_entropy(out["out"][0, :, 1, 2][None], torch.tensor([1]))
    assert seg.loss(out, mask) == pytest.approx(float(expected))
    with_aux = Segmentation(aux_weight=0.5).loss(out, mask)
    aux = F.cross_entropy(out["aux"][0, :, 1, 2][None], torch.tensor([1]))
    assert with_aux == pytest.approx(float(expected + 0.5 * aux))
    other = Segmentation(ignore_index=7, aux_weight=0.0)  # 255 is then a label, out of range for 3 classes
    with pytest.raises((IndexError, RuntimeError)):
        other.loss(out, mask)
    meter = seg.meter(torch.device("cpu"))
    pred = out["out"].argmax(1)
    meter.update(out, mask)
    m = meter.compute()
    assert m["pixel_acc"] == float(pred[0, 1, 2] == 1)


def test_miou_by_hand():
    """mIoU over the classes present: one image, two classes, known confusion."""
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 1, 0, :2] = 1  # predicts 1 1 0 0
    mask = torch.tensor([[[1, 0, 0, 255]]])  # truth 1 0 0 (ignored)
    meter = Segmentation().meter(torch.device("cpu"))
    meter.update(logits, mask)
    m = meter.compute()
    # class 0: tp 1 (pixel 2), fp 0, fn 1 (pixel 1) -> 1/2; class 1: tp 1, fp 1, fn 0 -> 1/2
    assert m["miou"] == pytest.approx(0.5) and m["pixel_acc"] == pytest.approx(2 / 3)


def test_segmentation_labels_are_checked_against_the_model_but_the_ignore_index_is_allowed():
    train, test = _seg_loaders()
    bad = _seg_set(16, 3)
    bad.tensors[1][0, 3, 3] = 9
    with pytest.raises(InputError, match=r"label 9 is outside \[0, 4\).*ignore index 255"):
        slimrarts.prune(TinySeg(), (DataLoader(bad, batch_size=8), test), 0.3, task="segmentation", config=TINY,
                        progress=False)


def test_a_classification_task_refuses_masks_and_names_the_segmentation_task():
    with pytest.raises(DataError, match="segmentation"):
        slimrarts.prune(TinySeg(), _seg_loaders(), 0.3, config=TINY, progress=False)


class _Recorder:
    """A loss_fn that counts its calls while a flag says which stage runs."""

    def __init__(self):
        self.stage, self.calls = None, {}

    def __call__(self, out, target):
        self.calls[self.stage] = self.calls.get(self.stage, 0) + 1
        return Segmentation(aux_weight=0.0).loss(out, target)


@pytest.mark.parametrize("method", ["rarts", "taylor", "slimming"])
def test_a_custom_loss_is_called_in_every_phase(method):
    """The user's loss trains the search (rarts: both weight copies and α), scores Taylor's gradients, trains
    Slimming's sparsity phase, re-estimates nothing (recalibration reads no loss) and fine-tunes."""
    rec = _Recorder()
    recipe = load_recipe(TINY, [f"search.method={method}", "finetune.epochs=1", "search.epochs=1"])
    task = resolve_task("segmentation", recipe, loss_fn=rec)
    assert isinstance(task, CustomTask) and task.metric == "miou"
    run = prepare(TinySeg(), _seg_loaders(), recipe, progress=False, task=task)
    for stage in (search, select, remove, recalibrate, finetune):
        rec.stage = stage.__name__
        stage(run)
    steps = len(run.loaders.search_t)
    if method == "rarts":  # w-step on D_t, y-step on D_v, α-step on D_v (and the λ-coupling reads no data)
        assert rec.calls["search"] >= 3 * steps
    elif method == "taylor":
        assert rec.calls["search"] == min(len(run.loaders.train), recipe.baselines.taylor_batches)
    else:
        assert rec.calls["search"] == len(run.loaders.train)
    assert rec.calls["finetune"] == len(run.loaders.train)
    assert "recalibrate" not in rec.calls and "select" not in rec.calls and "remove" not in rec.calls


def test_a_custom_metric_is_reported_under_its_name():
    def worst_pixel_error(out, target):
        valid = target != 255
        return ((out["out"].argmax(1) != target) & valid).float().sum() / valid.sum()

    result = slimrarts.prune(TinySeg(aux=False), _seg_loaders(), 0.3, task="segmentation", config=TINY,
                             progress=False, metric_fn=worst_pixel_error)
    rep = result.report
    assert rep["task"]["metric"] == "metric"
    pixel_err = 1 - evaluate(result.model, _seg_loaders()[1], task=Segmentation())["pixel_acc"]
    assert rep["accuracy"]["slim_after_finetune"] == pytest.approx(pixel_err, abs=1e-6)


def test_get_task_names_what_is_allowed():
    assert isinstance(get_task(None), Classification)
    assert get_task("segmentation", ignore_index=3).ignore_index == 3
    with pytest.raises(InputError, match="classification, segmentation, detection"):
        get_task("depth")
    with pytest.raises(InputError, match="no setting ignore_idx"):
        get_task("segmentation", ignore_idx=3)
    with pytest.raises(TypeError, match="lacks"):
        get_task(object())


def test_the_recipe_names_the_task_and_distillation_is_refused_where_it_has_no_meaning():
    recipe = load_recipe({"task": {"name": "segmentation", "ignore_index": 0}})
    task = resolve_task(None, recipe)
    assert isinstance(task, Segmentation) and task.ignore_index == 0
    with pytest.raises(ValueError, match="finetune.distill"):
        load_recipe({"task": {"name": "segmentation"}, "finetune": {"distill": {"weight": 0.5}}})
    distilled = load_recipe({"finetune": {"distill": {"weight": 0.5}}})
    assert isinstance(resolve_task(None, distilled), Classification)  # distillation of a classifier stays allowed
    with pytest.raises(InputError, match="replace your loss_fn"):  # it would fine-tune on its own loss instead
        resolve_task(None, distilled, loss_fn=lambda out, target: out.sum())
    with pytest.raises(InputError, match="replace your loss_fn"):
        resolve_task(get_task("classification", loss_fn=lambda out, target: out.sum()), distilled)
    assert resolve_task(None, distilled, metric_fn=lambda out, target: 1.0).metric == "metric"


def _tiny_detector(num_classes: int = 3) -> nn.Module:
    """torchvision's Faster R-CNN on a two-conv backbone at 64 px: the detection task's plumbing in seconds."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.rpn import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    backbone.out_channels = 16
    return FasterRCNN(backbone, num_classes=num_classes, min_size=64, max_size=64,
                      rpn_anchor_generator=AnchorGenerator(sizes=((16, 32),), aspect_ratios=((1.0,),)),
                      box_roi_pool=MultiScaleRoIAlign(["0"], output_size=4, sampling_ratio=2),
                      rpn_batch_size_per_image=32, box_batch_size_per_image=16, rpn_pre_nms_top_n_test=50,
                      rpn_post_nms_top_n_test=20, box_detections_per_img=10)


class _Squares(torch.utils.data.Dataset):
    """64-px images with one or two bright squares (class = which channel is bright) and their boxes; some
    images have none."""

    def __init__(self, n: int, seed: int, sizes: tuple[int, ...] = (64,)):
        self.items = []
        g = torch.Generator().manual_seed(seed)
        for i in range(n):
            img = torch.rand(3, sizes[i % len(sizes)], 64, generator=g) * 0.2
            boxes, labels = [], []
            for _ in range(0 if i % 5 == 4 else 1 + i % 2):
                x0, y0 = (int(v) for v in torch.randint(0, 40, (2,), generator=g))
                s = int(torch.randint(12, 24, (1,), generator=g))
                c = int(torch.randint(1, 3, (1,), generator=g))
                img[c - 1, y0:y0 + s, x0:x0 + s] = 1.0
                boxes.append([x0, y0, x0 + s, y0 + s])
                labels.append(c)
            self.items.append((img, {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                     "labels": torch.tensor(labels, dtype=torch.int64)}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _collate(batch):
    return tuple(zip(*batch, strict=True))


def test_a_detectors_macs_are_counted_at_its_full_number_of_proposals():
    """The box head runs once per proposal: its MACs must not follow how many proposals survive NMS on one random
    image (the count and the cost model a MACs budget reads)."""
    from slimrarts.metrics import macs_and_params
    from slimrarts.width import attach_gates
    from slimrarts.width.cost import build_cost_model

    torch.manual_seed(0)
    model = _tiny_detector()
    # 512 anchors at 64 px: of the 400 best, NMS keeps fewer than 300, and how many depends on the image
    model.rpn._pre_nms_top_n["testing"], model.rpn._post_nms_top_n["testing"] = 400, 300
    head = sum(m.in_features * m.out_features + m.out_features for m in model.roi_heads.box_head.modules()
               if isinstance(m, nn.Linear)) + sum(m.in_features * m.out_features + m.out_features
                                                  for m in model.roi_heads.box_predictor.modules()
                                                  if isinstance(m, nn.Linear))
    counts = {macs_and_params(model, example_inputs=(torch.rand(1, 3, 64, 64) * s,))[0] for s in (0.01, 1, 100)}
    backbone = macs_and_params(model.backbone, (1, 3, 64, 64))[0]
    assert len(counts) == 1 and counts.pop() >= backbone + 300 * head  # post_nms_top_n = 300 proposals
    assert (model.rpn.nms_thresh, model.rpn.score_thresh, model.roi_heads.score_thresh) == (0.7, 0.0, 0.05)
    gates = attach_gates(model, torch.rand(1, 3, 64, 64))
    assert build_cost_model(gates).dense[0] == macs_and_params(model, (1, 3, 64, 64))[0]


def test_detection_end_to_end_through_prune():
    """A torchvision detector is searched (its train-mode loss dict summed), cut (the removal check on the raw
    heads), recalibrated (train mode with targets), fine-tuned and reported with COCO mAP."""
    pytest.importorskip("torchmetrics", reason="the detection task's mAP needs the tasks extra")
    torch.manual_seed(0)
    train = DataLoader(_Squares(24, 0), batch_size=4, shuffle=True, collate_fn=_collate,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(_Squares(8, 1), batch_size=4, collate_fn=_collate)
    result = slimrarts.prune(_tiny_detector(), (train, test), 0.3, task="detection", config=TINY, progress=False)
    rep = result.report
    assert rep["task"]["metric"] == "map" and {"map", "map_50"} <= set(rep["task"]["test"])
    assert rep["macs"]["after"] < rep["macs"]["before"]
    assert rep["removal_max_abs_diff"] is not None and rep["removal_max_abs_diff"] < 1e-3
    assert set(result.width_spec["max_abs_diff_by_module"]) >= {"rpn.head", "roi_heads.box_predictor"}
    slim_out = result.model([torch.rand(3, 64, 64)])
    assert isinstance(slim_out, list) and {"boxes", "scores", "labels"} <= set(slim_out[0])


def test_detection_batches_of_images_of_different_sizes_go_through_prune():
    """A batch holds images of different heights (a list, as torchvision's detectors take them): search, cut,
    recalibration, fine-tuning and evaluation read it."""
    pytest.importorskip("torchmetrics", reason="the detection task's mAP needs the tasks extra")
    torch.manual_seed(0)
    train = DataLoader(_Squares(24, 0, sizes=(64, 48, 56)), batch_size=4, shuffle=True, collate_fn=_collate,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(_Squares(8, 1, sizes=(48, 64)), batch_size=4, collate_fn=_collate)
    assert len({tuple(img.shape) for img in next(iter(train))[0]}) > 1
    result = slimrarts.prune(_tiny_detector(), (train, test), 0.3, task="detection", config=TINY, progress=False)
    assert result.report["macs"]["after"] < result.report["macs"]["before"]
    assert result.report["accuracy"]["slim_after_finetune"] is not None


def _relabel(ds, i: int, labels=None, boxes=None):
    img, t = ds.items[i]
    ds.items[i] = (img, {"boxes": t["boxes"] if boxes is None else torch.tensor(boxes, dtype=torch.float32),
                         "labels": t["labels"] if labels is None else torch.tensor(labels, dtype=torch.int64)})
    return ds


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"labels": [0]}, InputError, r"label 0 is outside \[1, 3\).*0 is the background class"),
    ({"labels": [3]}, InputError, r"label 3 is outside \[1, 3\).*num_classes=4 or more"),
    ({"boxes": [[40.0, 40.0, 80.0, 60.0]]}, DataError, r"target 0 has the box \[40.0, 40.0, 80.0, 60.0\].*outside "
                                                       r"its 64×64 image"),
])
def test_detection_labels_and_boxes_are_checked_against_the_model_and_the_image(change, error, message):
    """A label the detector has no class for (0 is its background; 3 with num_classes=3) and a box outside its
    image are named errors, not a device assert or a silently clipped box."""
    torch.manual_seed(0)
    train = DataLoader(_relabel(_Squares(24, 0), 0, **change), batch_size=4, collate_fn=_collate)
    test = DataLoader(_Squares(8, 1), batch_size=4, collate_fn=_collate)
    with pytest.raises(error, match=message):
        slimrarts.prune(_tiny_detector(), (train, test), 0.3, task="detection", config=TINY, progress=False)


def test_the_detection_task_reads_the_classes_of_torchvisions_detectors():
    from torchvision.models.detection import retinanet_resnet50_fpn, ssdlite320_mobilenet_v3_large

    task = get_task("detection")
    assert task.classes_of(_tiny_detector(num_classes=5)) == 5
    kw = {"weights": None, "weights_backbone": None}
    assert task.classes_of(retinanet_resnet50_fpn(num_classes=7, **kw)) == 7
    assert task.classes_of(ssdlite320_mobilenet_v3_large(num_classes=6, **kw)) == 6
    assert task.classes_of(nn.Conv2d(3, 3, 1)) is None


@pytest.mark.parametrize("method", list_methods())
def test_every_method_prunes_a_segmentation_model_with_the_users_loss(method):
    """Each search method and baseline goes through the task: the user's loss is what fine-tunes (and what trains
    every method that trains), and the report reads mIoU at every stage."""
    rec = _Recorder()
    rec.stage = "all"
    torch.manual_seed(0)
    result = slimrarts.prune(TinySeg(), _seg_loaders(), 0.3, method=method, task="segmentation", loss_fn=rec,
                             config=TINY, progress=False)
    rep = result.report
    assert rep["task"]["metric"] == "miou" and rep["method"] == method
    assert rep["macs"]["after"] < rep["macs"]["before"]
    assert all(rep["accuracy"][k] is not None for k in ("dense", "slim_before_finetune", "slim_after_finetune"))
    batches = len(_seg_loaders()[0])  # fine-tuning reads the loss once per training batch
    extra, data = rec.calls["all"] - batches, get_method(method).data
    if method == "taylor":  # its gradients
        assert 1 <= extra <= batches
    elif data == "none":  # a weight criterion reads no loss before fine-tuning
        assert extra == 0
    else:  # a search over the two halves reads at least one, a one-net method the whole set
        assert extra >= (batches // 2 if data == "split" else batches)


@pytest.mark.slow
@pytest.mark.parametrize("method", list_methods())
def test_every_method_prunes_a_detector(method):
    pytest.importorskip("torchmetrics", reason="the detection task's mAP needs the tasks extra")
    torch.manual_seed(0)
    train = DataLoader(_Squares(24, 0), batch_size=4, shuffle=True, collate_fn=_collate,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(_Squares(8, 1), batch_size=4, collate_fn=_collate)
    if method == "slimming":  # Faster R-CNN's RPN and box heads have no norms: refused, naming the first
        with pytest.raises(InputError, match="slimming scores channels by BN γ, but group 'rpn.head.conv"):
            slimrarts.prune(_tiny_detector(), (train, test), 0.3, method=method, task="detection", config=TINY,
                            progress=False)
        return
    result = slimrarts.prune(_tiny_detector(), (train, test), 0.3, method=method, task="detection", config=TINY,
                             progress=False)
    assert result.report["task"]["metric"] == "map" and result.report["macs"]["after"] < result.report["macs"]["before"]
    assert result.report["removal_max_abs_diff"] < 1e-3
