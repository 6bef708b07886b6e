"""The segmentation (VOC masks) and detection (COCO JSON) readers, their joint augmentation and loaders, on small
generated files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import slimrarts
from slimrarts.data import (
    CocoDetection,
    SegmentationFolder,
    detection_collate,
    detection_transform,
    segmentation_transform,
    task_loaders,
)
from slimrarts.errors import DataError, InputError, MissingFileError

pytest.importorskip("pycocotools", reason="the COCO reader needs the tasks extra (pycocotools)")

SHADE = 60  # class k is painted with red = SHADE * k, so a pixel's class can be read back from the image


def _write_voc(root, ids=("a", "b", "c", "d"), size=(24, 20), classes=("background", "cat", "dog")):
    """Images whose red channel encodes the class of each pixel, palette masks with those classes, an ignore
    border and a classes.txt."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    w, h = size
    rng = np.random.default_rng(0)
    for k, stem in enumerate(ids):
        mask = np.zeros((h, w), np.uint8)
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        mask[y0:y0 + h // 2, x0:x0 + w // 2] = 1 + k % 2
        image = np.zeros((h, w, 3), np.uint8)
        image[..., 0] = mask * SHADE
        mask[0, :] = 255
        Image.fromarray(image).save(root / "JPEGImages" / f"{stem}.png")  # PNG: lossless, the colours stay exact
        pal = Image.fromarray(mask, mode="P")
        pal.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
        pal.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:-1]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[-1] + "\n")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_voc_folder_reads_palette_indices_and_counts_classes(tmp_path):
    root = _write_voc(tmp_path / "voc")
    ds = SegmentationFolder(root, "train")
    assert ds.classes == ("background", "cat", "dog") and len(ds) == 3
    image, mask = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 20, 24) and mask.shape == (20, 24)
    assert set(mask.unique().tolist()) == {0, 2, 255}  # the palette's indices, not its colours
    inside = mask != 255
    assert torch.equal((image[0][inside].long() + SHADE // 2) // SHADE, mask[inside])
    assert ds.pixel_counts.sum() == 3 * 19 * 24 and ds.pixel_counts[1] > 0 and ds.pixel_counts[2] > 0
    assert len(SegmentationFolder(root, "val")) == 1


def test_voc_named_errors(tmp_path):
    root = _write_voc(tmp_path / "voc", classes=None)
    with pytest.raises(InputError, match="classes.txt.*num_classes"):
        SegmentationFolder(root)
    with pytest.raises(DataError, match=r"b\.png.*values \[2\].*2 classes"):
        SegmentationFolder(root, num_classes=2)  # mask b holds class 2
    assert SegmentationFolder(root, num_classes=3, ignore_index=255).num_classes == 3
    with pytest.raises(DataError, match="values \\[255\\]"):
        SegmentationFolder(root, num_classes=3, ignore_index=0)  # 255 is then a value, not the ignore index
    with pytest.raises(MissingFileError, match="'test'.*the splits there: \\['train', 'val'\\]"):
        SegmentationFolder(root, "test", num_classes=3)
    Image.new("RGB", (24, 20)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png.*RGB image.*convert colour masks"):
        SegmentationFolder(root, num_classes=3)
    Image.new("L", (10, 20)).save(root / "SegmentationClass" / "a.png")
    with pytest.raises(DataError, match="a.png' is 10x20 but its image .* is 24x20"):
        SegmentationFolder(root, num_classes=3)
    (root / "SegmentationClass" / "a.png").unlink()
    with pytest.raises(MissingFileError, match="1 mask.*a.png"):
        SegmentationFolder(root, num_classes=3)


def test_segmentation_augmentation_moves_the_mask_with_the_image(tmp_path):
    """After random-resized crops and flips, each labelled pixel's class is still the one its colour encodes."""
    root = _write_voc(tmp_path / "voc", size=(48, 40))
    ds = SegmentationFolder(root, transform=segmentation_transform(True, 32, scale=(0.3, 1.0), mean=(0, 0, 0),
                                                                   std=(1, 1, 1)))
    torch.manual_seed(0)
    for _ in range(6):
        for i in range(len(ds)):
            image, mask = ds[i]
            assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and mask.shape == (32, 32)
            assert mask.dtype == torch.int64
            colour = (image[0] * 255 + SHADE // 2).long() // SHADE
            inside = mask != 255
            # bilinear image vs nearest mask differ only along the edges of the regions
            assert (colour[inside] == mask[inside]).float().mean() > 0.9
    evaluation = SegmentationFolder(root, transform=segmentation_transform(False, 16))
    assert evaluation[0][0].shape == (3, 16, 16) and evaluation[0][1].shape == (16, 16)


def _write_coco(root, split="train2017", *, anns=None, images=None):
    (root / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "one.jpg", "width": 40, "height": 30},
                        {"id": 2, "file_name": "two.jpg", "width": 50, "height": 50},
                        {"id": 3, "file_name": "empty.jpg", "width": 20, "height": 20},
                        {"id": 4, "file_name": "four.jpg", "width": 30, "height": 20}]
    for info in images:
        Image.new("RGB", (info["width"], info["height"]), (40, 40, 40)).save(root / split / info["file_name"])
    anns = anns if anns is not None else [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 10, 20.5, 20], "area": 400, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 3, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [5, 5, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 14, "image_id": 4, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
    ]
    blob = {"images": images, "annotations": anns,
            "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(blob))
    return root


def test_coco_reader_maps_categories_converts_boxes_and_keeps_empty_images(tmp_path):
    ds = CocoDetection(_write_coco(tmp_path / "coco"), "train")
    assert ds.classes == ("background", "cat", "dog") and ds.num_classes == 3 and len(ds) == 4
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 1
    # xywh -> xyxy; the box 0.5 px past the right edge is clipped to it; category 3 -> label 1, 7 -> label 2
    assert torch.equal(target["boxes"], torch.tensor([[2, 3, 12, 11], [20, 10, 40, 30]], dtype=torch.float32))
    assert target["labels"].tolist() == [2, 1]
    assert ds[1][1]["labels"].tolist() == [2]  # the crowd annotation is left out
    empty = ds[2][1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)


@pytest.mark.parametrize("ann, message", [
    ({"bbox": [30, 5, 12, 5]}, "annotation 10 .*one.jpg.*40x30.*leaves the image"),
    ({"bbox": [3, 3, 0, 5]}, "annotation 10 .*of no area"),
    ({"bbox": [40.5, 5, 0.3, 5]}, "annotation 10 .*of no area within the image"),  # past the edge, within slack
    ({"category_id": 99}, "annotation 10 .*category_id 99.*\\[3, 7\\]"),
])
def test_coco_named_errors(tmp_path, ann, message):
    base = {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0}
    root = _write_coco(tmp_path / "coco", anns=[{**base, **ann}])
    with pytest.raises(DataError, match=message):
        CocoDetection(root, "train")


def test_coco_boxes_of_no_area_can_be_dropped_and_are_counted(tmp_path):
    anns = [{"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 0], "area": 0, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 3, "bbox": [50.2, 3, 0.5, 8], "area": 4, "iscrowd": 0}]
    root = _write_coco(tmp_path / "coco", anns=anns)
    with pytest.raises(DataError, match="annotation 10 .*empty_boxes='drop'"):
        CocoDetection(root, "train")
    with pytest.warns(RuntimeWarning, match="2 box\\(es\\) of no area .* the first 10"):
        ds = CocoDetection(root, "train", empty_boxes="drop")
    assert ds.dropped == [10, 12] and ds[0][1]["labels"].tolist() == [1] and ds[1][1]["boxes"].shape == (0, 4)
    with pytest.raises(InputError, match="empty_boxes='skip'.*'error'.*'drop'"):
        CocoDetection(root, "train", empty_boxes="skip")


def test_coco_missing_files_are_named(tmp_path):
    root = _write_coco(tmp_path / "coco")
    with pytest.raises(MissingFileError, match="instances_val\\*.json.*found none.*instances_train2017.json"):
        CocoDetection(root, "val")
    (root / "train2017" / "two.jpg").unlink()
    with pytest.raises(MissingFileError, match="image 2 .*two.jpg"):
        CocoDetection(root, "train")
    with pytest.raises(InputError, match="ann_file= and images= together"):
        CocoDetection(root, ann_file=root / "annotations" / "instances_train2017.json")


def test_detection_augmentation_moves_boxes_with_the_image(tmp_path):
    """A bright square's box follows flips and crops: the box still frames the bright pixels, and boxes cut away
    by a crop leave with their labels."""
    root = tmp_path / "coco"
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 12, 10], "area": 120, "iscrowd": 0}]
    _write_coco(root, "train", anns=anns, images=[{"id": 1, "file_name": "one.png", "width": 48, "height": 32}])
    img = np.full((32, 48, 3), 10, np.uint8)
    img[6:16, 4:16] = 250
    Image.fromarray(img).save(root / "train" / "one.png")
    ds = CocoDetection(root, "train", transform=detection_transform(True, crop=1.0))
    torch.manual_seed(0)
    seen_flip = False
    for _ in range(20):
        image, target = ds[0]
        assert image.dtype == torch.float32 and float(image.max()) <= 1.0
        assert len(target["boxes"]) == len(target["labels"])
        bright = (image[0] > 0.5).nonzero()
        if len(target["boxes"]) == 0:
            continue
        x1, y1, x2, y2 = target["boxes"][0].tolist()
        ys, xs = bright[:, 0].float(), bright[:, 1].float()
        assert xs.min() >= x1 - 1 and xs.max() < x2 + 1 and ys.min() >= y1 - 1 and ys.max() < y2 + 1
        seen_flip |= x1 > image.shape[-1] / 2
    assert seen_flip


def test_evaluation_keeps_every_box_training_drops_those_under_a_pixel(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [4, 6, 0.5, 10], "area": 5, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [20, 6, 8, 10], "area": 80, "iscrowd": 0}]
    root = _write_coco(tmp_path / "coco", anns=anns)
    kept = CocoDetection(root, "train", transform=detection_transform(False))[0][1]
    assert kept["labels"].tolist() == [1, 2] and torch.allclose(kept["boxes"][0], torch.tensor([4, 6, 4.5, 16.]))
    trained = CocoDetection(root, "train", transform=detection_transform(True, crop=0.0))[0][1]
    assert trained["labels"].tolist() == [2]


def test_task_loaders_batch_detection_images_of_different_sizes_and_split_the_halves(tmp_path):
    ds = CocoDetection(_write_coco(tmp_path / "coco"), "train", transform=detection_transform(False))
    loaders = task_loaders(ds, ds, batch_size=4, seed=0)
    images, targets = next(iter(loaders.train))
    assert isinstance(images, list) and {tuple(i.shape) for i in images} == {(3, 30, 40), (3, 50, 50), (3, 20, 20),
                                                                        (3, 20, 30)}
    assert isinstance(targets, list) and all("boxes" in t for t in targets)
    assert loaders.num_classes == 3
    t, v = set(loaders.search_t.dataset.indices), set(loaders.search_v.dataset.indices)
    assert not t & v and t | v == {0, 1, 2, 3}
    assert detection_collate([(1, "a"), (2, "b")]) == ([1, 2], ["a", "b"])
    with pytest.raises(InputError, match="batch_size must be an int >= 1"):
        task_loaders(ds, ds, batch_size=0)


class _TinySeg(torch.nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(8, classes, 1)

    def forward(self, x):
        return {"out": self.head(self.body(x))}


def test_a_voc_folder_is_pruned_end_to_end(tmp_path):
    """The reader's loaders through prune(): search, cut, fine-tune and an mIoU in the report."""
    root = _write_voc(tmp_path / "voc", ids=tuple("abcdefgh"), size=(32, 32))
    train = SegmentationFolder(root, "train", transform=segmentation_transform(True, 16))
    test = SegmentationFolder(root, "val", transform=segmentation_transform(False, 16))
    torch.manual_seed(0)
    config = {"search": {"epochs": 1}, "finetune": {"epochs": 1}, "prune": {"scope": ["internal"], "recalibrate": 1}}
    result = slimrarts.prune(_TinySeg(), task_loaders(train, test, batch_size=2), 0.3, task="segmentation",
                             config=config, progress=False)
    assert result.report["task"]["metric"] == "miou"
    assert result.report["macs"]["after"] < result.report["macs"]["before"]


def test_recipes_name_the_task_sets_and_check_them_before_any_work(tmp_path):
    from slimrarts.data import make_loaders
    from slimrarts.errors import ConfigError
    from slimrarts.recipe import load_recipe

    root = _write_voc(tmp_path / "voc", ids=tuple("abcdef"), size=(24, 24))
    recipe = load_recipe({"data": {"name": "voc", "root": str(root), "image_size": 16, "batch_size": 2,
                                   "workers": 0}, "task": {"name": "segmentation"}})
    loaders = make_loaders(recipe.data)
    images, masks = next(iter(loaders.train))
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16) and loaders.num_classes == 3
    assert loaders.info["dataset"] == "voc" and loaders.info["train"] == 5 and loaders.info["test"] == 1
    # the recipe's task.ignore_index is the reader's: with 254, the masks' 255 border is a value of no class
    from slimrarts.commands.width import build_from_recipe
    from slimrarts.config import to_dict

    other = load_recipe({**to_dict(recipe), "task": {"name": "segmentation", "ignore_index": 254}})
    with pytest.raises(DataError, match="holds values \\[255\\].*not the ignore index 254"):
        build_from_recipe(other, torch.device("cpu"))
    # data.crop_scale reaches the voc reader's crops: a crop of the whole image keeps the masks' ignore row on top,
    # crops of under a third of it mostly do not
    for scale, whole in (([1.0, 1.0], True), ([0.2, 0.3], False)):
        cropped = load_recipe({**to_dict(recipe), "data": {**to_dict(recipe)["data"], "image_size": 24,
                                                           "crop_scale": scale}})
        masks = torch.cat([m for _, m in make_loaders(cropped.data).train])
        assert bool((masks[:, 0] == 255).all()) is whole, scale
    with pytest.raises(ConfigError, match="data.crop_scale: only used by data.name=imagefolder or voc, not coco"):
        load_recipe({"data": {"name": "coco", "crop_scale": [0.5, 1.0]}, "task": {"name": "detection"}})
    with pytest.raises(ConfigError, match="data.name=voc holds segmentation data, but task.name=classification"):
        load_recipe({"data": {"name": "voc", "root": str(root)}})
    with pytest.raises(ConfigError, match="data.num_classes: only used by data.name=voc, not coco"):
        load_recipe({"data": {"name": "coco", "num_classes": 4}, "task": {"name": "detection"}})
    with pytest.raises(ConfigError, match="data.empty_boxes=drop: only used by data.name=coco, not voc"):
        load_recipe({"data": {"name": "voc", "empty_boxes": "drop"}, "task": {"name": "segmentation"}})
    with pytest.raises(ConfigError, match="data.limit_per_class: a coco set has no class per image"):
        load_recipe({"data": {"name": "coco", "limit_per_class": 4}, "task": {"name": "detection"}})
    coco = load_recipe({"data": {"name": "coco", "root": None}, "task": {"name": "detection"}})
    with pytest.raises(InputError, match="data.name=coco needs the folder holding annotations/instances_"):
        make_loaders(coco.data)


def test_torchvision_task_models_are_named_in_the_registry_and_built_without_downloads():
    from slimrarts.models import create_model, is_model

    assert is_model("torchvision:lraspp_mobilenet_v3_large") and is_model("torchvision:ssdlite320_mobilenet_v3_large")
    model = create_model("torchvision:lraspp_mobilenet_v3_large", num_classes=5)  # weights_backbone=None: no download
    assert model.classifier.low_classifier.out_channels == 5


def test_the_cli_trains_prunes_and_compares_a_segmentation_recipe(tmp_path, capsys, monkeypatch):
    """`slimrarts train` and `run` on a VOC recipe print the task's metric (mIoU), not a classifier's accuracy,
    which a segmentation report does not have; `report` names the metric per row."""
    import yaml

    from slimrarts.cli import main
    from slimrarts.engine import console
    from slimrarts.models import registry

    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_INFO", dict(registry._INFO))
    registry.register_model(name="tiny_seg")(lambda num_classes: _TinySeg(num_classes))
    monkeypatch.setattr(console, "width", 200)  # the tables' labels on one line

    root = _write_voc(tmp_path / "voc", ids=tuple("abcdef"), size=(32, 32))
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "tiny-seg", "seed": 0, "device": "cpu", "task": {"name": "segmentation"},
        "data": {"name": "voc", "root": str(root), "image_size": 32, "batch_size": 2, "workers": 0},
        "model": {"name": "tiny_seg"},
        "train": {"epochs": 1}, "search": {"epochs": 1}, "finetune": {"epochs": 1},
        "prune": {"scope": ["internal"], "ratio": 0.2, "recalibrate": 1}, "report": {"latency": False}}))
    assert main(["train", str(recipe), "--out", str(tmp_path / "base"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "base" / "report.json").read_text())
    printed = capsys.readouterr().out
    assert report["metric"] == "miou" and report["test_acc"] is None and "test mIoU (final epoch)" in printed
    assert f"{100 * report['test_metric']:.2f}%" in printed
    assert main(["run", str(recipe), "--out", str(tmp_path / "pr"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "test mIoU, slim → fine-tuned" in printed and "test acc" not in printed
    assert main(["report", str(tmp_path / "base"), str(tmp_path / "pr"), "--md", str(tmp_path / "t.md")]) == 0
    table = (tmp_path / "t.md").read_text()
    assert "| test metric |" in table and table.count("| miou |") == 2
    assert f"{100 * report['test_metric']:.2f}%" in table
