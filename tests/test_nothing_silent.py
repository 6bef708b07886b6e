"""Nothing silent, round two (issue 22): one error family and its exit codes, OS errors in one line, every loader
shape a user passes (dicts, iterables, float or one-hot labels, non-finite pixels, empty loaders, samplers), wrapped
models, paths that leave the folder, files that cannot be read. Each case asserts that the message names the
problem and that nothing outside the run folder changed."""

from __future__ import annotations

import errno
import json
import re
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TINY_PRUNE, tiny_recipe_file
from torch.utils.data import DataLoader, IterableDataset, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

import slimrarts
from slimrarts.cli import main
from slimrarts.data import as_loaders
from slimrarts.errors import EXIT_CODES, DataError, InputError, SlimrartsError
from slimrarts.models import create_model

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_PRUNE
_recipe = tiny_recipe_file


def _tree(folder: Path, skip: Path | None = None) -> dict:
    """Every file under `folder` (outside `skip` and the data cache slimrarts keeps beside the archive, `cache/`)
    with its bytes: what must not change."""
    cache = folder / "cache"
    return {p: p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and cache not in p.parents and (skip is None or skip not in p.parents)}


def _float_loaders(tiny_sets, *, train_ds=None, batch=20, **train_kw):
    train, test = tiny_sets
    train_ds = train_ds if train_ds is not None else TensorDataset(train.images.float() / 255, train.labels)
    return (DataLoader(train_ds, batch_size=batch, **train_kw),
            DataLoader(TensorDataset(test.images.float() / 255, test.labels), batch_size=40))


def _prune(loaders, model=None, **kw):
    return slimrarts.prune(model if model is not None else create_model("tiny_preresnet"), loaders, 0.4,
                           config=TINY, progress=False, **kw)


# ---- one error family, one table of exit codes -----------------------------------------------------------------

def test_exit_codes_are_in_help_and_readme(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    shown = capsys.readouterr().out
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## When things go wrong"):]
    for code, what in EXIT_CODES.items():
        assert re.search(rf"^\s*{code}\s+{re.escape(what)}$", shown, re.M), (code, shown)
        assert re.search(rf"\|\s*{code}\s*\|", section), f"exit code {code} missing from README"


def test_a_user_error_exits_2_with_one_line_and_a_bug_shows_its_traceback(tmp_path, tiny_archive, capsys,
                                                                         monkeypatch):
    recipe = _recipe(tmp_path, tiny_archive, prune={"ratio": 1.5})
    assert main(["run", recipe, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prune.ratio" in err
    assert not (tmp_path / "run").exists()

    import slimrarts.commands.width as width

    def bug(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(width, "prune_recipe", bug)
    with pytest.raises(ZeroDivisionError):  # not turned into exit 2: Python prints it and exits 1
        main(["run", _recipe(tmp_path, tiny_archive), "--out", str(tmp_path / "run2")])


def test_user_errors_keep_their_builtin_types():
    from slimrarts.config import ConfigError
    from slimrarts.engine.checkpoint import CorruptFileError
    from slimrarts.engine.dist import PeerError
    from slimrarts.engine.epochs import DivergenceError

    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, SlimrartsError)
    assert issubclass(CorruptFileError, ValueError) and issubclass(CorruptFileError, SlimrartsError)
    assert DivergenceError("search", 1, "α", "x").exit_code == 3 and PeerError("x").exit_code == 5
    with pytest.raises(ValueError):
        slimrarts.prune(create_model("tiny_resnet"), object(), 1.5, config=TINY)


# ---- OS errors: one line naming the path and the cause -----------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_ends_in_one_line(code, tmp_path, tiny_archive, capsys, monkeypatch):
    import slimrarts._io as sio

    recipe = _recipe(tmp_path, tiny_archive)
    out = tmp_path / "run"
    real = sio.atomic_file
    calls = []

    def failing(path, **kw):  # the third file the run writes fails as a full / read-only disk would
        calls.append(path)
        if len(calls) == 3:
            raise OSError(code, __import__("os").strerror(code), str(path))
        return real(path, **kw)
    monkeypatch.setattr(sio, "atomic_file", failing)
    before = _tree(tmp_path, skip=out)
    assert main(["run", recipe, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert errno.errorcode[code] in err and str(calls[2]) in err
    assert _tree(tmp_path, skip=out) == before
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # nothing half-written


def test_out_pointing_at_a_file_is_named(tmp_path, tiny_archive, capsys):
    target = tmp_path / "afile"
    target.write_text("mine")
    assert main(["run", _recipe(tmp_path, tiny_archive), "--out", str(target)]) == 2
    assert str(target) in capsys.readouterr().err and target.read_text() == "mine"


def test_out_of_memory_names_the_batch_size(tmp_path, tiny_archive, capsys, monkeypatch):
    import slimrarts.commands.width as width

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(width, "prune_recipe", oom)
    assert main(["run", _recipe(tmp_path, tiny_archive), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "data.batch_size" in err


# ---- wrapped models ----------------------------------------------------------------------------------------------

def test_data_parallel_and_compiled_models_are_refused_at_once(tiny_sets):
    loaders = _float_loaders(tiny_sets)
    with pytest.raises(TypeError, match=r"DataParallel.*model\.module"):
        _prune(loaders, nn.DataParallel(create_model("tiny_preresnet")))
    with pytest.raises(TypeError, match=r"torch\.compile.*model\._orig_mod"):
        _prune(loaders, torch.compile(create_model("tiny_preresnet")))  # refused before anything compiles
    inner = create_model("tiny_preresnet")  # a compiled submodule: before, its groups were skipped with a wrong reason
    inner.layer1 = torch.compile(inner.layer1)
    with pytest.raises(TypeError, match=r"model\.layer1 is a torch\.compile'd module.*model\.layer1\._orig_mod"):
        _prune(loaders, inner)


# ---- every loader shape ------------------------------------------------------------------------------------------

class _Dicts(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class _Stream(IterableDataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def test_dict_batches_are_named(tiny_sets):
    train, _ = tiny_sets
    loaders = _float_loaders(tiny_sets, train_ds=_Dicts(train.images.float() / 255, train.labels))
    with pytest.raises(DataError, match=r"train loader's first batch is a dict \(keys \['image', 'label'\]\)"):
        _prune(loaders)


def test_a_test_loader_of_dicts_is_named_before_training(tiny_sets, monkeypatch):
    import slimrarts.api as api

    _, test = tiny_sets
    tr, _ = _float_loaders(tiny_sets)
    te = DataLoader(_Dicts(test.images.float() / 255, test.labels), batch_size=40)
    monkeypatch.setattr(api, "search", lambda run: pytest.fail("the search started"))
    with pytest.raises(DataError, match=r"the test loader's first batch is a dict"):
        _prune((tr, te))


def test_an_iterable_dataset_without_length_is_named(tiny_sets):
    train, _ = tiny_sets
    loaders = _float_loaders(tiny_sets, train_ds=_Stream(train.images.float() / 255, train.labels))
    with pytest.raises(InputError, match=r"IterableDataset.*search_t and search_v"):
        _prune(loaders)
    tr, te = loaders  # with the halves given, the loaders themselves have no length
    with pytest.raises(DataError, match=r"train loader has no length"):
        _prune({"train": tr, "test": te, "search_t": tr, "search_v": tr})


@pytest.mark.parametrize("labels, match", [
    (lambda y: y.float(), r"torch\.float32 labels.*y\.long\(\)"),
    (lambda y: torch.nn.functional.one_hot(y, 10).float(), r"one-hot or soft labels.*y\.argmax\(1\)"),
    (lambda y: torch.nn.functional.one_hot(y, 10), r"look one-hot.*y\.argmax\(1\)"),
])
def test_float_and_one_hot_labels_are_named(labels, match, tiny_sets):
    train, _ = tiny_sets
    ds = TensorDataset(train.images.float() / 255, labels(train.labels))
    with pytest.raises(DataError, match=match):
        _prune(_float_loaders(tiny_sets, train_ds=ds))


@pytest.mark.parametrize("where", [0, 130])
def test_non_finite_pixels_are_a_data_problem_not_a_learning_rate(where, tiny_sets):
    train, _ = tiny_sets
    x = train.images.float() / 255
    x[where, 0, 3, 3] = float("nan")
    with pytest.raises(DataError, match=r"non-finite input values.*data problem") as err:
        _prune(_float_loaders(tiny_sets, train_ds=TensorDataset(x, train.labels), shuffle=False))
    assert "lr" not in str(err.value).split("data problem")[0]
    if where:  # found as the batch streams, with its index (20 per batch, not shuffled)
        assert re.search(r"loader's batch \d+ has non-finite", str(err.value)), err.value


def test_drop_last_with_fewer_samples_than_a_batch_names_the_loader(tiny_sets):
    tr, te = _float_loaders(tiny_sets)
    te = DataLoader(te.dataset, batch_size=500, drop_last=True)
    with pytest.raises(DataError, match=r"test loader yields no batches \(80 samples, batch_size=500, "
                                        r"drop_last=True\)"):
        _prune((tr, te))


def _half_labels(loader) -> set[int]:
    return {int(v) for _, y in loader for v in y}


def test_the_halves_keep_a_weighted_samplers_weights(tiny_sets):
    train, _ = tiny_sets
    weights = (train.labels < 3).double()  # the user never draws classes 3..9
    sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)
    tr, te = _float_loaders(tiny_sets, sampler=sampler)
    loaders = as_loaders((tr, te), seed=0)
    for half in (loaders.search_t, loaders.search_v):
        assert _half_labels(half) <= {0, 1, 2}
    assert len(loaders.search_t.sampler) + len(loaders.search_v.sampler) == len(weights)


def test_the_halves_keep_a_subset_sampler_and_refuse_a_batch_sampler(tiny_sets):
    train, _ = tiny_sets
    subset = (train.labels % 2 == 0).nonzero().squeeze(1).tolist()
    tr, te = _float_loaders(tiny_sets, sampler=SubsetRandomSampler(subset))
    loaders = as_loaders((tr, te), seed=0)
    t, v = set(loaders.search_t.dataset.indices), set(loaders.search_v.dataset.indices)
    assert t | v == set(subset) and not t & v
    batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(tr.dataset), 20, drop_last=False)
    with pytest.raises(InputError, match=r"batch_sampler \(BatchSampler\).*search_t and search_v"):
        as_loaders((DataLoader(tr.dataset, batch_sampler=batches), te))


def test_a_custom_sampler_is_refused_with_what_to_pass(tiny_sets):
    class EveryOther(torch.utils.data.Sampler):
        def __init__(self, n):
            self.n = n

        def __iter__(self):
            return iter(range(0, self.n, 2))

        def __len__(self):
            return self.n // 2

    tr, te = _float_loaders(tiny_sets)
    with pytest.raises(InputError, match=r"sampler is a EveryOther.*search_t and search_v"):
        as_loaders((DataLoader(tr.dataset, batch_size=20, sampler=EveryOther(len(tr.dataset))), te))


# ---- paths stay inside the folder the user chose -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escaped", "a/b", "/abs", ".."])
def test_a_recipe_name_cannot_leave_the_runs_folder(name, tmp_path, tiny_archive, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _recipe(tmp_path, tiny_archive, name=name)
    before = _tree(tmp_path)
    assert main(["run", recipe]) == 2
    err = capsys.readouterr().err
    assert "name:" in err and "--out" in err
    assert _tree(tmp_path) == before and not (tmp_path / "runs").exists()


# ---- files slimrarts reads fail naming them ----------------------------------------------------------------------

@pytest.mark.parametrize("content, what", [("", "is empty"), ("{\"report\": ", "is not valid JSON"),
                                           ("[1, 2]", "not a slimrarts report")])
def test_a_damaged_report_is_named(content, what, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(content)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert str(run / "report.json") in err and what in err


def test_read_json_names_a_binary_file_and_jsonl_names_the_line(tmp_path):
    from slimrarts._io import read_json, read_jsonl
    from slimrarts.errors import FileProblem, MissingFileError

    (tmp_path / "b.json").write_bytes(b"\x80\x81\x82")
    with pytest.raises(FileProblem, match=r"b\.json is not a text file"):
        read_json(tmp_path / "b.json", what="prune.reference: ")
    with pytest.raises(MissingFileError, match=r"prune.reference: .*nope\.json: no such file"):
        read_json(tmp_path / "nope.json", what="prune.reference: ")
    (tmp_path / "m.jsonl").write_text(json.dumps({"a": 1}) + "\n\n{\"a\": \n")
    with pytest.raises(FileProblem, match=r"m\.jsonl: line 3 is not valid JSON"):
        read_jsonl(tmp_path / "m.jsonl")


# ---- settings the data set or the model does not fit -------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [({"num_classes": 100}, "model.kwargs.num_classes"),
                                           ({"in_channels": 1}, "unexpected keyword argument 'in_channels'"),
                                           ({}, "data.image_size: only used by data.name=imagefolder")])
def test_settings_the_data_or_model_does_not_fit_are_named_before_training(kwargs, named, tmp_path, tiny_archive,
                                                                          capsys):
    extra = {"model": {"name": "tiny_preresnet", "kwargs": kwargs}}
    if not kwargs:  # CIFAR stays 32x32: an image size is refused, not silently ignored
        extra["data"] = {"name": "cifar10", "root": tiny_archive, "batch_size": 25, "image_size": 64}
    out = tmp_path / "run"
    assert main(["run", _recipe(tmp_path, tiny_archive, **extra), "--out", str(out)]) == 2
    assert named in capsys.readouterr().err and not out.exists()


def test_a_reference_spec_of_another_model_fails_before_training(tiny_sets, tmp_path, monkeypatch):
    import slimrarts.baselines.random_pruning as random_pruning

    torch.manual_seed(0)
    cfg = dict(TINY, search={"method": "random", "epochs": 1}, prune={"scope": ["internal"]})
    spec = slimrarts.prune(create_model("tiny_preresnet"), _float_loaders(tiny_sets), 0.4, config=cfg,
                           progress=False).width_spec
    for g in spec["groups"]:
        g["kept"] = list(range(len(g["kept"]) + 1000))  # wider than the group: another model's widths
    run = tmp_path / "ref"
    run.mkdir()
    (run / "width_spec.json").write_text(json.dumps(spec))
    monkeypatch.setattr(random_pruning, "fit", lambda *a, **k: pytest.fail("training started"))
    cfg = dict(cfg, prune={"scope": ["internal"], "reference": str(run)})
    with pytest.raises(InputError, match=r"prune.reference .* keeps \d+ channels of group .* which has \d+"):
        slimrarts.prune(create_model("tiny_preresnet"), _float_loaders(tiny_sets), 0.4, config=cfg, progress=False)


# ---- the second probe's cases (after the first version of this file) ---------------------------------------------

def test_a_random_sampler_with_replacement_keeps_its_draws_in_the_halves(tiny_sets):
    tr, te = _float_loaders(tiny_sets)
    sampler = torch.utils.data.RandomSampler(tr.dataset, replacement=True, num_samples=4 * len(tr.dataset))
    loaders = as_loaders((DataLoader(tr.dataset, batch_size=20, sampler=sampler), te), seed=0)
    halves = (loaders.search_t.sampler, loaders.search_v.sampler)
    assert all(h.replacement for h in halves)
    assert sum(len(h) for h in halves) == 4 * len(tr.dataset)  # not one pass without replacement


def test_a_distributed_sampler_in_one_process_and_an_unbatched_loader_are_named(tiny_sets):
    tr, te = _float_loaders(tiny_sets)
    shard = torch.utils.data.DistributedSampler(tr.dataset, num_replicas=2, rank=0)
    with pytest.raises(InputError, match=r"shard 0 of 2, but this is one process"):
        as_loaders((DataLoader(tr.dataset, batch_size=20, sampler=shard), te))
    with pytest.raises(InputError, match=r"unbatched \(batch_size=None\)"):
        as_loaders((DataLoader(tr.dataset, batch_size=None), te))


def test_a_dict_output_with_several_tensors_and_no_logits_is_not_guessed(tiny_sets):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = create_model("tiny_resnet")
            self.fc = nn.Linear(10, 10)

        def forward(self, x):
            f = self.net(x)
            return {"feat": f, "pred": self.fc(f)}

    with pytest.raises(TypeError, match=r"'feat', 'pred'.*no 'logits'.*output_fn"):
        _prune(_float_loaders(tiny_sets), TwoHeads())


def test_int32_labels_are_named(tiny_sets):
    train, _ = tiny_sets
    ds = TensorDataset(train.images.float() / 255, train.labels.int())
    with pytest.raises(DataError, match=r"torch.int32 labels.*y\.long\(\)"):
        _prune(_float_loaders(tiny_sets, train_ds=ds))


def test_numpy_and_tensor_scalars_are_plain_settings(tiny_sets):
    import numpy as np

    from slimrarts.api import _resolve_recipe

    assert abs(_resolve_recipe(TINY, ratio=np.float32(0.4)).prune.ratio - 0.4) < 1e-6
    assert _resolve_recipe(TINY, search_epochs=torch.tensor(3)).search.epochs == 3


def test_a_reference_whose_kept_is_not_a_list_is_named(tiny_sets, tmp_path):
    from slimrarts.baselines.random_pruning import _kept_count

    assert _kept_count({"name": "g", "kept": [0, 2]}) == 2
    with pytest.raises(TypeError, match=r"group 'g': 'kept' must be a list of channel indices, got str"):
        _kept_count({"name": "g", "kept": "[0]"})


def test_report_names_a_missing_folder_and_a_report_that_is_a_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "r" / "report.json").mkdir(parents=True)
    assert main(["report", str(tmp_path / "r")]) == 2
    assert "is a folder, not a report" in capsys.readouterr().err


def test_report_md_never_overwrites_a_run_folders_file(tmp_path, capsys):
    from slimrarts.engine.rundir import MARKER

    run = tmp_path / "run"
    run.mkdir()
    (run / MARKER).write_text("{}")
    (run / "report.json").write_text(json.dumps({"slimrarts": "x"}))
    (run / "recipe.yaml").write_text("name: mine\n")
    assert main(["report", str(run), "--md", str(run / "recipe.yaml")]) == 2
    assert "file of a run folder" in capsys.readouterr().err and (run / "recipe.yaml").read_text() == "name: mine\n"


def test_a_binary_or_folder_recipe_is_named(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    assert main(["run", str(tmp_path / "bin.yaml")]) == 2
    assert "not a text file" in capsys.readouterr().err
    (tmp_path / "dir.yaml").mkdir()
    assert main(["run", str(tmp_path / "dir.yaml")]) == 2
    assert "is a folder, not a recipe file" in capsys.readouterr().err


def test_a_metrics_line_cut_short_is_dropped_and_a_damaged_one_named(tmp_path):
    from slimrarts.engine.rundir import RunDir
    from slimrarts.errors import FileProblem

    rd = RunDir(tmp_path)
    good = json.dumps({"phase": "search", "epoch": 0})
    (tmp_path / "metrics.jsonl").write_text(good + "\n" + '{"phase": "search", "ep')
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert rd.metrics() == [{"phase": "search", "epoch": 0}]
    (tmp_path / "metrics.jsonl").write_text('{"pha\n' + good + "\n")
    with pytest.raises(FileProblem, match=r"metrics.jsonl: line 1 is not valid JSON"):
        rd.metrics()


def test_sigterm_interrupts_the_command_and_the_handler_is_restored():
    import os
    import signal

    from slimrarts.cli import _sigterm_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), _sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once; without it the process would have been killed
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_os_error_without_a_path_gets_the_file_being_written(tmp_path):
    import slimrarts._io as sio

    target = tmp_path / "ckpt.pt"
    with pytest.raises(OSError) as err, sio.atomic_file(target) as fh:
        fh.write(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert err.value.filename == str(target) and err.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_folder_of_yours_is_not_a_run_folder_whatever_is_asked(tmp_path, tiny_archive, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    for extra in ([], ["--resume"]):
        assert main(["run", _recipe(tmp_path, tiny_archive), "--out", str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert "data.csv" in err and "not a run folder slimrarts made" in err and "--force" not in err
    assert [p.name for p in mine.iterdir()] == ["data.csv"]


def test_a_damaged_settings_history_is_named(tmp_path):
    from slimrarts.engine.rundir import HISTORY, RunDir
    from slimrarts.errors import FileProblem

    (tmp_path / HISTORY).write_text(json.dumps({"segments": 5}))
    with pytest.raises(FileProblem, match=r"settings_history.json is not a settings history"):
        RunDir(tmp_path).history()


def test_a_reference_that_is_not_a_width_spec_fails_before_the_run_folder_is_made(tiny_sets, tmp_path):
    bad = tmp_path / "slim.pt"
    bad.write_bytes(b"PK\x03\x04 not json")
    cfg = dict(TINY, search={"method": "random", "epochs": 1}, prune={"scope": ["internal"], "reference": str(bad)})
    with pytest.raises(InputError, match=r"prune.reference"):
        slimrarts.prune(create_model("tiny_preresnet"), _float_loaders(tiny_sets), 0.4, config=cfg,
                        run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_one_loader_for_both_search_halves_is_warned(tiny_sets):
    tr, te = _float_loaders(tiny_sets)
    with pytest.warns(RuntimeWarning, match="search_t and search_v are the same loader"):
        as_loaders({"train": tr, "test": te, "search_t": tr, "search_v": tr})


@pytest.mark.parametrize("report, named", [({"slimrarts": "x"}, "has no field 'params'"),
                                           ({"slimrarts": "x", "params": "many", "macs": 1}, "wrong type")])
def test_a_report_missing_a_field_or_of_the_wrong_type_is_named(report, named, tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "report.json").write_text(json.dumps(report))
    assert main(["report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "r" / "report.json") in err and named in err


def test_a_file_in_the_way_and_a_dangling_link_are_named(tmp_path, tiny_archive, capsys):
    (tmp_path / "afile").write_text("mine")
    run = tmp_path / "r"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({"slimrarts": "x", "params": 1, "macs": 1}))
    assert main(["report", str(run), "--md", str(tmp_path / "afile" / "t.md")]) == 2
    assert "ENOTDIR" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["run", _recipe(tmp_path, tiny_archive), "--out", str(tmp_path / "dangling")]) == 2
    assert "symbolic link to" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
