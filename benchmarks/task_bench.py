"""Segmentation and detection pruned on a synthetic set made from CIFAR-10 (issue 24, deliverable 4).

    SLIMRARTS_DATA=../shared/data nohup python benchmarks/task_bench.py > runs/task_bench.log 2>&1 &
    python benchmarks/task_bench.py --time      # dense vs slim latency, on an otherwise idle machine
    python benchmarks/task_bench.py --report    # the table from what has finished
    python benchmarks/task_bench.py --parts     # where each cut went (backbone MACs, box-head widths)
    python benchmarks/task_bench.py --confusion # what the dense segmentation model gets wrong

No segmentation or detection set can be downloaded here, so `benchmarks/synth_tasks.py` builds one from the shared
CIFAR-10 archive (objects pasted through soft masks onto canvases tiled from other CIFAR images; test canvases from
CIFAR's test images only) and writes it in VOC (masks) and COCO (JSON) layout; this script reads those files
with the library's readers, exactly as a user's recipe would (`data.name: voc` / `coco`).

For each task (`recipes/tasks/synth_segmentation.yaml`: LR-ASPP MobileNetV3-Large, 96-px crops;
`recipes/tasks/synth_detection.yaml`: Faster R-CNN MobileNetV3-Large 320 FPN at 160 px with fewer sampled
proposals):
1. the dense model is trained (`slimrarts train`) and must reach the task's stated floor (`FLOORS`) before anything
   is pruned: below it, a cut would measure noise. Detection starts from random weights; segmentation's backbone
   is first trained as a CIFAR-10 classifier on CIFAR's training images
   (`recipes/tasks/synth_segmentation_backbone.yaml`, runs/tasks/segmentation/backbone-<epochs>ep-<px>px/) and
   copied in, since from random weights LR-ASPP found the objects but not their class (RESULTS);
2. it is cut to half its MACs (scope internal + coupled, BN recalibration) with rarts (`search.score: grad`, the
   choice of issue 20's held-out study) and with group-norm, the best criterion of the CPU table, and each slim
   model is fine-tuned with the same epochs;
3. `--time` measures dense and slim latency (batch 1, the library's timing harness) when nothing else runs.
Finished runs are reused, interrupted ones resumed (runs/tasks/<task>/<epochs>ep[-<n>train]-<px>px[-backbone<e>ep]/
<row>: a recipe with another dense `train.epochs` or `data.image_size`, a task with another number of training
canvases, or a backbone pretrained for another number of epochs starts a new folder (the first pretrained run, 6
backbone epochs, is `8ep-16000train-96px-pretrained`), and the JSON keeps the earlier figures under `earlier`; a
finished run asked for other settings is refused, naming them). Segmentation trains on 16,000 canvases, detection
on 2,000 (`TASKS`);
results in benchmarks/results/task_bench.json. What such a set can and cannot show: see RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_baseline, run_prune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "task_bench.json"
TASKS = {
    "segmentation": {"recipe": ROOT / "recipes" / "tasks" / "synth_segmentation.yaml", "layout": "voc",
                     "metric": "miou", "train_canvases": 16000,
                     "backbone": ROOT / "recipes" / "tasks" / "synth_segmentation_backbone.yaml"},
    "detection": {"recipe": ROOT / "recipes" / "tasks" / "synth_detection.yaml", "layout": "coco",
                  "metric": "map_50", "train_canvases": 2000},
}
# Segmentation's training set is larger: on 2,000 canvases LR-ASPP learned where the objects are (background IoU
# 0.99) but not which class they are (38% of the object pixels of the test canvases right, 64% of the training
# canvases'; `--confusion`), so its mIoU stalled under the floor (RESULTS). The test canvases are the same 500
# for every size.
DEFAULT_CANVASES = 2000  # the set in --data itself; a set of another size is built beside it, in <data>-<n>train
# The dense model must reach these on the synthetic test canvases before it is pruned (chance is about 1/11 mIoU
# for segmentation and 0 mAP for detection).
FLOORS = {"segmentation": 0.40, "detection": 0.15}
ROWS = {"rarts": ["search.method=rarts", "search.score=grad"], "group-norm": ["search.method=group-norm"]}


def _synth(data: Path, cifar: str | None, size: int = 160, train: int = 2000, test: int = 500) -> dict:
    """The synthetic set under `data` (built once by synth_tasks.py, then reused)."""
    from synth_tasks import build

    build(_cifar(cifar), data, size=size, train=train, test=test, seed=0)
    return json.loads((data / "synth.json").read_text())


def _save(data: dict) -> None:
    from slimrarts._io import atomic_write

    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(OUT, json.dumps({**data, "machine": machine(torch.device("cpu"))}, indent=1))


SETS: list[str] = []  # --set overrides, applied to every recipe after the script's own


def _recipe(task: str, data: Path, extra: list[str]):
    from slimrarts.recipe import load_recipe

    spec = TASKS[task]
    return load_recipe(spec["recipe"], [f"data.root={data / spec['layout']}", *extra, *SETS])


def _row(report: dict, metric: str) -> dict:
    a, t = report["accuracy"], report["time_s"]
    test = report["task"]["test"]
    return {"metric": report["task"]["metric"], "test": test, "headline": test.get(metric),
            "stages": {k: a.get(k) for k in ("dense", "masked", "slim_stale_bn", "slim_before_finetune",
                                             "slim_after_finetune")},
            "macs": report["macs"], "params": report.get("params"), "wall_s": t.get("search", 0.0) + t.get(
                "finetune", 0.0), "settings": {k: report["settings"][k] for k in ("search", "prune", "finetune")}}


def _canvases(args, task: str) -> int:
    return args.train_canvases or TASKS[task]["train_canvases"]


def _synth_dir(args, task: str) -> Path:
    n = _canvases(args, task)
    return Path(args.data) if n == DEFAULT_CANVASES else Path(f"{args.data}-{n}train")


def _backbone_init(args, task: str, runs: Path, recipe) -> Path | None:
    """The dense model's starting weights when the task pretrains its backbone (`TASKS[task]["backbone"]`): that
    recipe trains MobileNetV3-Large as a CIFAR-10 classifier (`slimrarts train`, reused once finished) and its
    `features` become the segmentation model's `backbone` (the same modules, indexed alike); the head keeps the
    recipe's seeded random initialisation. Written to <folder>/init.pt; None when the task trains from scratch."""
    from slimrarts._io import atomic_write
    from slimrarts.commands.width import build_from_recipe
    from slimrarts.recipe import load_recipe

    spec = TASKS[task].get("backbone")
    if spec is None:
        return None
    pre = load_recipe(spec, [f"data.root={_cifar(args.cifar)}"])
    folder = runs / task / f"backbone-{pre.train.epochs}ep-{pre.data.image_size}px"
    report = run_baseline(pre, folder, progress=False)
    print(f"== {task}: backbone pretrained as a classifier, top-1 {report['test_metric']:.4f}", flush=True)
    classifier = torch.load(folder / "model.pt", map_location="cpu", weights_only=False)
    classifier = classifier.get("state_dict", classifier)
    _, model = build_from_recipe(recipe, torch.device("cpu"))
    state = model.state_dict()
    copied = {f"backbone.{k[len('features.'):]}": v for k, v in classifier.items() if k.startswith("features.")}
    missing = [k for k in copied if k not in state or state[k].shape != copied[k].shape]
    if missing or not any(k.startswith("backbone.") for k in state):
        raise SystemExit(f"task_bench: the classifier's features do not fit {type(model).__name__}'s backbone "
                         f"({missing[:3]})")
    left = [k for k in state if k.startswith("backbone.") and k not in copied]
    if left:
        raise SystemExit(f"task_bench: backbone tensors the classifier does not hold: {left[:3]}")
    state.update(copied)
    out = _folder(runs, task, recipe, _canvases(args, task)) / "init.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
    import io

    buf = io.BytesIO()
    torch.save({"state_dict": state, "backbone": str(folder / "model.pt"), "top1": report["test_metric"]}, buf)
    atomic_write(out, buf.getvalue())
    return out


def _cifar(cifar: str | None) -> str:
    if cifar is None:
        base = os.environ.get("SLIMRARTS_DATA")
        if not base:
            raise SystemExit("task_bench: set SLIMRARTS_DATA to the folder holding cifar10-jpg.tar.gz, or pass --cifar")
        cifar = str(Path(base) / "cifar10-jpg.tar.gz")
    return cifar


def _folder(runs: Path, task: str, recipe, canvases: int) -> Path:
    """The runs of one dense schedule: runs/tasks/<task>/<epochs>ep[-<n>train]-<px>px/{dense,rarts,group-norm} (a
    longer schedule, another training set or another image size is a new folder; a finished run is reused as it is).
    Folders made before the size was part of the name are `<epochs>ep[-<n>train]`."""
    tail = "" if canvases == DEFAULT_CANVASES else f"-{canvases}train"
    epochs = _backbone_epochs(task)
    pre = "" if epochs is None else f"-backbone{epochs}ep"
    return runs / task / f"{recipe.train.epochs}ep{tail}-{recipe.data.image_size}px{pre}"


def _backbone_epochs(task: str) -> int | None:
    """The pretraining epochs of the task's backbone recipe (None: trained from scratch)."""
    import yaml

    spec = TASKS[task].get("backbone")
    return None if spec is None else int(yaml.safe_load(Path(spec).read_text())["train"]["epochs"])


def run(args) -> dict:
    data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    runs = Path(args.runs)
    data["overrides"] = SETS
    for task in args.tasks:
        spec, entry = TASKS[task], data.setdefault(task, {"rows": {}})
        canvases, synth_dir = _canvases(args, task), _synth_dir(args, task)
        entry["synth"] = _synth(synth_dir, args.cifar, args.size, canvases, args.test_canvases)
        if canvases == DEFAULT_CANVASES:
            data["synth"] = entry["synth"]
        base = _recipe(task, synth_dir, [])
        folder = _folder(runs, task, base, canvases)
        dense_was = entry.get("dense", {})
        pretrained = _backbone_epochs(task)
        if dense_was and (dense_was.get("epochs"), dense_was.get("train_canvases", DEFAULT_CANVASES),
                          dense_was.get("image_size", base.data.image_size),
                          (dense_was.get("backbone") or {}).get("epochs")) != (
                base.train.epochs, canvases, base.data.image_size, pretrained):  # a new schedule, set, size, start
            earlier = {k: entry.pop(k) for k in ("dense", "rows", "latency_ms", "latency_spread", "latency_load",
                                                 "parts") if k in entry}
            entry.setdefault("earlier", []).append(earlier)
            entry["rows"] = {}
        init = _backbone_init(args, task, runs, base)
        if init is not None:
            base = _recipe(task, synth_dir, [f"model.weights={init}"])
        dense = run_baseline(base, folder / "dense", progress=False)
        value = dense["test_metric"] if spec["metric"] == dense["metric"] else None
        if value is None:  # the recipe reports the headline metric; detection's floor reads mAP@.5
            value = json.loads((folder / "dense" / "metrics.jsonl").read_text().splitlines()[-1]).get(
                f"test_{spec['metric']}")
        entry["dense"] = {"metric": spec["metric"], "value": value, "test_metric": dense["test_metric"],
                          "macs": dense["macs"], "params": dense["params"], "epochs": dense["epochs"],
                          "train_s": dense["train_s"], "floor": FLOORS[task], "train_canvases": canvases,
                          "image_size": base.data.image_size}
        if init is not None:
            saved = torch.load(init, map_location="cpu", weights_only=False)
            entry["dense"]["backbone"] = {"recipe": str(spec["backbone"].relative_to(ROOT)), "top1": saved["top1"],
                                       "epochs": pretrained}
        _save(data)
        print(f"== {task}: dense {spec['metric']} {value:.4f} (floor {FLOORS[task]})", flush=True)
        if value < FLOORS[task] and not args.ignore_floor:
            print("   below the floor: not pruned; train longer (recipe train.epochs)", flush=True)
            continue
        for name, over in ROWS.items():
            if name in entry["rows"]:
                continue
            print(f"== {task} / {name}", flush=True)
            recipe = _recipe(task, synth_dir, [f"model.weights={folder / 'dense' / 'model.pt'}", *over])
            report = run_prune(recipe, folder / name, progress=False)
            entry["rows"][name] = _row(report, spec["metric"])
            print(f"   {spec['metric']} {entry['rows'][name]['headline']:.4f}, MACs "
                  f"{report['macs']['after'] / 1e6:.1f}M of {report['macs']['before'] / 1e6:.1f}M", flush=True)
            _save(data)
    return data


def time_rows(args) -> dict:
    """Latency at batch 1 of each dense and slim model (the library's harness), on an otherwise idle machine."""
    from slimrarts.commands.width import build_from_recipe
    from slimrarts.engine.task import get_task
    from slimrarts.timing import time_models
    from slimrarts.width import load_slim

    load = os.getloadavg()[0]
    if load > 0.7 and not args.force:
        raise SystemExit(f"task_bench --time: the load average is {load:.2f}; timings need an idle machine "
                         "(stop the background runs, or pass --force to time anyway)")
    data = json.loads(OUT.read_text())
    runs = Path(args.runs)
    for task in args.tasks:
        entry = data.get(task, {})
        if not entry.get("rows"):
            continue
        canvases = _canvases(args, task)
        recipe = _recipe(task, _synth_dir(args, task), [])
        loaders, dense = build_from_recipe(recipe, torch.device("cpu"))
        task_obj = get_task(task, **recipe.task.options())
        x = task_obj.example(task_obj.split(next(iter(loaders.test)))[0])[:1].float()
        names = ["dense", *entry["rows"]]
        models = [dense] + [load_slim(_folder(runs, task, recipe, canvases) / name / "slim.pt", copy.deepcopy(dense))
                            for name in entry["rows"]]
        timed = time_models(models, tuple(x.shape[1:]), rounds=5, repeats=10)
        entry["latency_ms"] = {n: 1e3 * t.median_s for n, t in zip(names, timed, strict=True)}
        entry["latency_spread"] = {n: t.spread for n, t in zip(names, timed, strict=True)}
        entry["latency_load"] = load
        print(task, entry["latency_ms"], flush=True)
    _save(data)
    return data


def parts(args) -> dict:
    """Where each cut went: MACs of the backbone (with its FPN, if any) at one test image's size and, for a
    detector, the widths of its box head (fc6 in and out, fc7 out), for the dense and every slim model."""
    from slimrarts.commands.width import build_from_recipe
    from slimrarts.metrics import macs_and_params
    from slimrarts.width import load_slim

    data = json.loads(OUT.read_text())
    runs = Path(args.runs)
    for task in args.tasks:
        entry = data.get(task, {})
        if not entry.get("rows"):
            continue
        canvases = _canvases(args, task)
        recipe = _recipe(task, _synth_dir(args, task), [])
        loaders, dense = build_from_recipe(recipe, torch.device("cpu"))
        size = (1, *next(iter(loaders.test))[0][0].shape[-3:])  # one test image (a list of images for detection)
        found = {}
        for name in ["dense", *entry["rows"]]:
            model = dense if name == "dense" else load_slim(_folder(runs, task, recipe, canvases) / name / "slim.pt",
                                                            copy.deepcopy(dense))
            found[name] = {"backbone_macs": macs_and_params(model.backbone, size)[0]}
            head = getattr(getattr(model, "roi_heads", None), "box_head", None)
            if head is not None:
                found[name]["box_head"] = [head.fc6.in_features, head.fc6.out_features, head.fc7.out_features]
        entry["parts"] = found
        print(task, found, flush=True)
    _save(data)
    return data


def confusion(args) -> dict:
    """What a segmentation model gets wrong, on the test canvases and on the first `--train-subset` training
    canvases (both at the evaluation resize): background IoU, the share of object pixels it calls background, and,
    of the object pixels it calls an object, the share whose class is right. `--checkpoint` is a run's
    checkpoints/train.pt or a model.pt (default: the dense model of the task's folder). Written to
    results/task_bench_confusion.json (its own file: a background run rewrites task_bench.json from memory)."""
    from torch.utils.data import DataLoader, Subset

    from slimrarts.commands.width import build_from_recipe
    from slimrarts.data.tasksets import SegmentationFolder, segmentation_transform

    out = OUT.with_name("task_bench_confusion.json")
    data = json.loads(out.read_text()) if out.is_file() else {}
    task = "segmentation"
    canvases = _canvases(args, task)
    recipe = _recipe(task, _synth_dir(args, task), [])
    loaders, model = build_from_recipe(recipe, torch.device("cpu"))
    runs = Path(args.runs).resolve()
    path = Path(args.checkpoint).resolve() if args.checkpoint else _folder(runs, task, recipe, canvases) / "dense" / \
        "model.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)  # train.pt: "model"; model.pt: "state_dict"
    model.load_state_dict(state["state_dict"] if "state_dict" in state else state.get("model", state))
    model.eval()
    n, ignore = loaders.num_classes, recipe.task.ignore_index
    report = path.parent / "report.json"  # a model.pt's epochs are its run's
    epochs = state["epoch"] + 1 if "epoch" in state else json.loads(report.read_text()).get("epochs") \
        if report.is_file() else None
    found = {"checkpoint": str(path), "epochs": epochs,
             "train_canvases": canvases, "date": time.strftime("%Y-%m-%d")}
    for split, limit in (("val", None), ("train", args.train_subset)):
        ds = SegmentationFolder(recipe.data.root, split, ignore_index=ignore, check=False,
                                transform=segmentation_transform(False, recipe.data.image_size))
        ds = Subset(ds, range(min(limit or len(ds), len(ds))))
        conf = torch.zeros(n, n, dtype=torch.long)
        with torch.no_grad():
            for x, y in DataLoader(ds, batch_size=recipe.data.eval_batch_size):
                pred, keep = model(x)["out"].argmax(1), y != ignore
                conf += torch.bincount(y[keep] * n + pred[keep], minlength=n * n).view(n, n)
        iou = conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag()).clamp(min=1)
        objects = conf[1:, 1:]
        found["test" if split == "val" else f"train_first_{len(ds)}"] = {
            "miou": iou.mean().item(), "pixel_acc": (conf.diag().sum() / conf.sum()).item(),
            "background_iou": iou[0].item(), "object_pixels_called_background": (conf[1:, 0].sum() /
                                                                                 conf[1:].sum()).item(),
            "object_class_right": (objects.diag().sum() / objects.sum()).item(),
            "class_iou": [round(v, 4) for v in iou.tolist()]}
    data[str(path.relative_to(runs) if path.is_relative_to(runs) else path)] = found
    print(json.dumps(found, indent=1), flush=True)
    from slimrarts._io import atomic_write

    atomic_write(out, json.dumps({**data, "machine": machine(torch.device("cpu"))}, indent=1))
    return json.loads(OUT.read_text()) if OUT.is_file() else {}


def table(data: dict) -> str:
    lines = ["| task (model) | dense → slim metric | MACs dense → slim | params dense → slim | cut → recal → "
             "fine-tuned | latency ms, batch 1 (dense → slim) | wall s (search + fine-tune) |",
             "|---|---|---|---|---|---|---|"]
    for task in TASKS:
        entry = data.get(task)
        if not entry or "dense" not in entry:
            continue
        d = entry["dense"]
        lat = entry.get("latency_ms", {})
        if not entry["rows"]:
            lines.append(f"| {task} | dense {d['metric']} {d['value']:.3f} (floor {d['floor']}; not pruned) | "
                         f"{d['macs'] / 1e6:.0f}M | | | | |")
        for name, r in entry["rows"].items():
            s = r["stages"]
            fmt = " → ".join(f"{v:.3f}" if v is not None else "–" for v in (s["slim_stale_bn"],
                                                                             s["slim_before_finetune"],
                                                                             s["slim_after_finetune"]))
            timing = (f"{lat['dense']:.1f} → {lat[name]:.1f}" if name in lat else "not timed")
            m, p = r["macs"], r["params"]
            lines.append(f"| {task}, {name} | {r['metric']} {s['dense']:.3f} → {s['slim_after_finetune']:.3f} "
                         f"({d['metric']} {r['headline']:.3f}) | {m['before'] / 1e6:.0f}M → {m['after'] / 1e6:.0f}M "
                         f"| {p['before'] / 1e6:.2f}M → {p['after'] / 1e6:.2f}M | {fmt} | {timing} | "
                         f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "tasks"))
    ap.add_argument("--data", default=str(ROOT / "runs" / "synth"), help="where the synthetic set is (or is built)")
    ap.add_argument("--cifar", default=None, help="the CIFAR-10 archive (default $SLIMRARTS_DATA/cifar10-jpg.tar.gz)")
    ap.add_argument("--tasks", default="segmentation,detection")
    ap.add_argument("--time", action="store_true", help="time the finished runs' models (idle machine only)")
    ap.add_argument("--force", action="store_true", help="with --time: time even on a busy machine")
    ap.add_argument("--report", action="store_true", help="print the table from finished runs; run nothing")
    ap.add_argument("--parts", action="store_true", help="record where each finished cut went (backbone MACs, "
                    "box-head widths)")
    ap.add_argument("--confusion", action="store_true", help="segmentation: what the dense model (or --checkpoint) "
                    "gets wrong, on test and training canvases")
    ap.add_argument("--checkpoint", default=None, help="with --confusion: a checkpoints/train.pt or model.pt")
    ap.add_argument("--train-subset", type=int, default=300, help="with --confusion: training canvases to score")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe override for every run (e.g. train.epochs=1 for a smoke test)")
    ap.add_argument("--size", type=int, default=160, help="canvas side of the synthetic set")
    ap.add_argument("--train-canvases", type=int, default=None, metavar="N",
                    help="training canvases of every task (default: each task's own, TASKS)")
    ap.add_argument("--test-canvases", type=int, default=500, metavar="N")
    ap.add_argument("--ignore-floor", action="store_true", help="prune even below the floor (smoke tests only)")
    ap.add_argument("--results", default=None, help="the results file (default benchmarks/results/task_bench.json)")
    args = ap.parse_args(argv)
    global OUT
    SETS[:] = args.set
    if args.results:
        OUT = Path(args.results)
    args.tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"task_bench: --tasks {unknown} unknown; choose from {list(TASKS)}")
    start = time.time()
    if args.report:
        data = json.loads(OUT.read_text()) if OUT.is_file() else {}
    elif args.time:
        data = time_rows(args)
    elif args.parts:
        data = parts(args)
    elif args.confusion:
        data = confusion(args)
    else:
        data = run(args)
    print(table(data))
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
