"""Resume: an interrupted run continues where its last checkpoint ended, runs only the remaining epochs, none twice.

What ran is read from what a run writes (`metrics.jsonl` lines with phase and epoch, the checkpoints' epoch counters,
the per-epoch image counts) and from how many batches each loader handed out; runs are interrupted by one helper,
`Interrupt`, a loader wrapper that raises KeyboardInterrupt mid-epoch, so none of this depends on the loops' hooks.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_recipe

from slimrarts.cli import main
from slimrarts.data import DeviceLoader, split_halves
from slimrarts.engine import fit, load_checkpoint
from slimrarts.models import create_model
from slimrarts.recipe import ArchOptimConfig, OptimConfig, TrainConfig
from slimrarts.search.loop import run_search
from slimrarts.search.problem import NetProblem, make_state
from slimrarts.width import attach_gates

TIMING = {"epoch_s", "images_per_s", "wall_s"}


class Interrupt:
    """A loader that counts the batches it hands out and raises KeyboardInterrupt instead of batch `stop_after` + 1
    (counted over all epochs); without `stop_after` it only counts."""

    def __init__(self, loader, stop_after: int | None = None):
        self.loader, self.stop_after, self.served = loader, stop_after, 0

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # set_epoch, num_classes, ... of the wrapped loader
        return getattr(self.loader, name)

    def __iter__(self):
        for batch in self.loader:
            if self.stop_after is not None and self.served >= self.stop_after:
                raise KeyboardInterrupt
            self.served += 1
            yield batch


def _lines(run_dir: Path) -> list[str]:
    path = Path(run_dir) / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _ran(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["phase"], r["epoch"]) for r in map(json.loads, _lines(run_dir))]


def _ckpt_epoch(run_dir: Path, phase: str) -> int | None:
    path = Path(run_dir) / "checkpoints" / f"{phase}.pt"
    return load_checkpoint(path)["epoch"] if path.exists() else None


def _without_timing(line: str) -> dict:
    return {k: v for k, v in json.loads(line).items() if k not in TIMING}


def _check_continued(before: list[str], after: list[str], full: list[str]) -> None:
    """The resumed run kept the lines written before the interruption byte for byte (those epochs did not run again),
    then wrote exactly the missing epochs, with the same figures as the uninterrupted run."""
    assert after[: len(before)] == before
    assert [json.loads(x)["phase"] for x in after] == [json.loads(x)["phase"] for x in full]
    assert [json.loads(x)["epoch"] for x in after] == [json.loads(x)["epoch"] for x in full]
    assert [_without_timing(x) for x in after] == [_without_timing(x) for x in full]


# ---- the search loop -----------------------------------------------------------------------------------------------

def _search(tiny_sets, run_dir, *, stop_after=None, resume=False, epochs=3):
    train, _ = tiny_sets
    torch.manual_seed(0)
    model = create_model("tiny_preresnet")
    gates = attach_gates(model, torch.randn(2, 3, 32, 32), ["internal", "branch-input"])
    idx_t, idx_v = split_halves(train.labels, seed=0)
    lt = Interrupt(DeviceLoader(train, 25, train=True, indices=idx_t, seed=1))
    lv = Interrupt(DeviceLoader(train, 25, train=True, indices=idx_v, seed=2), stop_after)
    problem = NetProblem(model, gates.alphas)
    optim = OptimConfig(lr=0.05, weight_decay=1e-4, milestones=[0.5])
    state = make_state(model, gates.alphas, "rarts", optim_w=optim, optim_arch=ArchOptimConfig(lr=1e-2), beta=0.1)
    try:
        run_search(problem, state, "rarts", epochs=epochs, optim_w=optim, loader_t=lt, loader_v=lv,
                   run_dir=str(run_dir), resume=resume, progress=False)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    return state, gates, (lt.served, lv.served), interrupted


def test_search_resume_runs_only_the_remaining_epochs(tiny_sets, tmp_path):
    n = 4  # iterations per epoch: 100 images per half, batches of 25
    full, gates_full, served, interrupted = _search(tiny_sets, tmp_path / "a")
    assert served == (3 * n, 3 * n) and not interrupted
    full_lines = _lines(tmp_path / "a")
    assert _ran(tmp_path / "a") == [("search", e) for e in range(3)]
    assert all(json.loads(x)["images"] == n * 50 for x in full_lines)

    # interrupted in the middle of epoch 1 (its third iteration): epoch 0 is done and checkpointed, epoch 1 is not
    _, _, served, interrupted = _search(tiny_sets, tmp_path / "b", stop_after=n + 2)
    assert interrupted and served == (n + 3, n + 2)
    before = _lines(tmp_path / "b")
    assert _ran(tmp_path / "b") == [("search", 0)] and _ckpt_epoch(tmp_path / "b", "search") == 0

    resumed, gates_res, served, interrupted = _search(tiny_sets, tmp_path / "b", resume=True)
    assert not interrupted
    assert served == (2 * n, 2 * n)  # epochs 1 and 2 only
    assert _ckpt_epoch(tmp_path / "b", "search") == 2
    _check_continued(before, _lines(tmp_path / "b"), full_lines)
    for k in full.w:
        assert torch.equal(full.w[k], resumed.w[k]), k
        assert torch.equal(full.y[k], resumed.y[k]), k
    for k in full.w_buffers:
        assert torch.equal(full.w_buffers[k], resumed.w_buffers[k]), k
        assert torch.equal(full.y_buffers[k], resumed.y_buffers[k]), k
    for a, b in zip(gates_full.alphas, gates_res.alphas, strict=True):
        assert torch.equal(a, b)
    # the optimizers continued too (momentum buffers, Adam moments and step counts)
    for opt in ("opt_w", "opt_y", "optim_arch"):
        sa, sb = getattr(full, opt).state_dict()["state"], getattr(resumed, opt).state_dict()["state"]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), opt


# ---- fit (the baseline's training, the fine-tuning) ----------------------------------------------------------------

def _fit(tiny_sets, run_dir, *, stop_after=None, resume=False):
    train, test = tiny_sets
    torch.manual_seed(0)
    model = torch.nn.Sequential(create_model("tiny_resnet"), torch.nn.Dropout(0.3))  # draws from the global RNG
    loader = Interrupt(DeviceLoader(train, 32, train=True, seed=3), stop_after)
    cfg = TrainConfig(epochs=3, optim=OptimConfig(lr=0.05, milestones=[0.5]), log_every=1)
    try:
        fit(model, loader, DeviceLoader(test, 50, train=False), cfg=cfg, device="cpu", run_dir=run_dir,
            resume=resume, progress=False)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    return model, loader.served, interrupted


def test_fit_resume_runs_only_the_remaining_epochs(tiny_sets, tmp_path):
    """As for the search; the model has dropout, so the same weights also need the RNG state restored."""
    n = 6  # 200 images in batches of 32, the partial last one dropped
    model, served, _ = _fit(tiny_sets, tmp_path / "a")
    assert served == 3 * n
    full_lines = _lines(tmp_path / "a")
    assert all(json.loads(x)["train_n"] == 192 for x in full_lines)

    _, served, interrupted = _fit(tiny_sets, tmp_path / "b", stop_after=2 * n + 1)  # in epoch 2
    assert interrupted and served == 2 * n + 1
    before = _lines(tmp_path / "b")
    assert _ran(tmp_path / "b") == [("train", 0), ("train", 1)] and _ckpt_epoch(tmp_path / "b", "train") == 1

    resumed, served, interrupted = _fit(tiny_sets, tmp_path / "b", resume=True)
    assert not interrupted and served == n  # epoch 2 only
    assert _ckpt_epoch(tmp_path / "b", "train") == 2
    _check_continued(before, _lines(tmp_path / "b"), full_lines)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ---- the whole pipeline, through the command line ------------------------------------------------------------------

def _recipe(tmp_path, archive) -> str:
    return write_tiny_recipe(tmp_path, archive)


def _cli_run(monkeypatch, recipe, out, extra, *, stop=None, resume=False):
    """`slimrarts run`, its loaders wrapped in `Interrupt`; `stop` = (loader name, stop_after). Returns (exit code,
    batches served per loader)."""
    import slimrarts.commands.width as width_command

    real = width_command.make_loaders
    wrapped = {}

    def make_loaders(*args, **kwargs):
        loaders = real(*args, **kwargs)
        for name in ("train", "search_t", "search_v"):
            wrapped[name] = Interrupt(getattr(loaders, name), stop[1] if stop and stop[0] == name else None)
        return dataclasses.replace(loaders, **wrapped)

    with monkeypatch.context() as patch:
        patch.setattr(width_command, "make_loaders", make_loaders)
        rc = main(["run", recipe, "--out", str(out), "--no-progress", *extra, *(["--resume"] if resume else [])])
    return rc, {k: v.served for k, v in wrapped.items()}


# method, the loader to interrupt (in the second epoch of the phase), the (phase, epoch) lines written before that
CLI_CASES = {
    "rarts-search": ("rarts", "search_v", [("search", 0)]),
    "rarts-finetune": ("rarts", "train", [("search", 0), ("search", 1), ("finetune", 0)]),
    "slimming-search": ("slimming", "train", [("search", 0)]),
    "random-search": ("random", "train", [("search", 0)]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_resume_runs_only_the_remaining_epochs(tmp_path, tiny_archive, monkeypatch, case):
    """Interrupted in the second epoch of a phase, `--resume` keeps what was done, runs only the missing epochs (each
    loader hands out exactly the batches of those) and ends with the same slim weights as one uninterrupted run."""
    method, loader, done = CLI_CASES[case]
    recipe = _recipe(tmp_path, tiny_archive)
    extra = ["--set", f"search.method={method}"]
    per_epoch = {"train": 8, "search_t": 4, "search_v": 4}  # 200 training images in batches of 25; halves of 100
    reads = {("search", "rarts"): ("search_t", "search_v"), ("search", "slimming"): ("train",),
             ("search", "random"): ("train",), ("finetune", "rarts"): ("train",)}

    rc, full_served = _cli_run(monkeypatch, recipe, tmp_path / "a", extra)
    assert rc == 0
    full_lines = _lines(tmp_path / "a")
    assert _ran(tmp_path / "a") == [("search", 0), ("search", 1), ("finetune", 0), ("finetune", 1)]

    recal = per_epoch["train"] if case.endswith("finetune") else 0  # the BN recalibration reads the cut's first batches
    rc, _ = _cli_run(monkeypatch, recipe, tmp_path / "b", extra, stop=(loader, recal + per_epoch[loader] + 1))
    assert rc == 130 and not (tmp_path / "b" / "slim.pt").exists()
    before = _lines(tmp_path / "b")
    assert _ran(tmp_path / "b") == done
    for phase in ("search", "finetune"):
        epochs = [e for p, e in done if p == phase]
        assert _ckpt_epoch(tmp_path / "b", phase) == (max(epochs) if epochs else None), phase

    rc, served = _cli_run(monkeypatch, recipe, tmp_path / "b", extra, resume=True)
    assert rc == 0
    skipped = {name: 0 for name in per_epoch}
    for phase, _ in done:
        for name in reads[phase, method]:
            skipped[name] += per_epoch[name]
    assert served == {name: full_served[name] - skipped[name] for name in per_epoch}
    assert {_ckpt_epoch(tmp_path / "b", p) for p in ("search", "finetune")} == {1}
    _check_continued(before, _lines(tmp_path / "b"), full_lines)
    a = torch.load(tmp_path / "a" / "slim.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "slim.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
