"""Export and deploy: `slimrarts.export` to ONNX and pt2, each file checked against PyTorch and loaded back (ONNX in
onnxruntime, pt2 without slimrarts); `slimrarts export` on run folders (export.json); the model_info `prune()`
records itself so that `slimrarts.load(run_dir)` needs no model."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn
import torchvision
from conftest import TinyGrouped, calibrated_bn, tiny_loaders, write_tiny_recipe

import slimrarts
import slimrarts.api as api
from slimrarts import deploy
from slimrarts.cli import main
from slimrarts.commands import export as export_cmd
from slimrarts.engine.rundir import foreign_entries
from slimrarts.errors import ExportMismatchError, InputError, MissingExtraError
from slimrarts.models import create_model
from slimrarts.models.provenance import infer_model_info
from slimrarts.width import ChannelSelect, attach_gates, remove_channels, save_slim, select_ratio

TINY = {"search": {"epochs": 1, "optim": {"lr": 0.05}, "optim_arch": {"lr": 0.01}},
        "finetune": {"epochs": 1, "optim": {"lr": 0.05}}, "prune": {"scope": ["internal", "branch-input"]},
        "report": {"latency": False}}


def _cut(model: nn.Module, x: torch.Tensor, scope) -> dict:
    """Cut 40% of the gated channels of `model` (random α) with the library's removal; returns the width spec."""
    gates = attach_gates(model, x[:2], scope)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for a in gates.alphas:
            a.copy_(torch.rand(a.shape, generator=g) + 0.2)
    spec = remove_channels(gates, select_ratio(gates.alphas, 0.4, repeats=gates.repeats), check_input=x)
    assert spec["max_abs_diff"] < 1e-4
    return spec


@pytest.fixture(scope="module")
def slim_models():
    """Two slim models cut by the library: a pre-activation ResNet with ChannelSelect gathers, a grouped-conv net."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    pre = calibrated_bn(create_model("tiny_preresnet"), 32)
    pre_spec = _cut(pre, x, ["internal", "branch-input"])
    assert any(isinstance(m, ChannelSelect) for m in pre.modules())
    grouped = calibrated_bn(TinyGrouped(), 16)
    _cut(grouped, x[:, :, :16, :16], "internal")
    conv = grouped.b[0]
    assert conv.groups == 4 and conv.in_channels < 16 and conv.out_channels < 32  # cut, and still grouped
    return {"channel-select": (pre, torch.randn(2, 3, 32, 32), pre_spec),
            "grouped": (grouped, torch.randn(2, 3, 16, 16), None)}


@pytest.fixture(scope="module")
def exported(slim_models, tmp_path_factory):
    """Both models to both formats: the ChannelSelect one with a dynamic batch, the grouped one at its fixed batch
    (its pt2 with onnx, onnxruntime and onnxscript hidden: pt2 needs no extra)."""
    folder = tmp_path_factory.mktemp("exported")
    out = {}
    for name, (model, x, _) in slim_models.items():
        for fmt in deploy.FORMATS:
            with pytest.MonkeyPatch.context() as mp:
                if fmt == "pt2" and name == "grouped":
                    for package in deploy.DEPLOY_PACKAGES:
                        mp.setitem(sys.modules, package, None)
                record = slimrarts.export(model, folder / f"{name}.{fmt}", x, format=fmt,
                                          dynamic_batch=name == "channel-select")
            out[name, fmt] = record
    return out


def _torch_out(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ["channel-select", "grouped"])
def test_both_formats_match_pytorch(exported, slim_models, name):
    """Within the stated fp32 tolerance, at two batch sizes with a dynamic batch; the ONNX file on its own has the
    recorded opset, a symbolic batch axis where asked, and PyTorch's answer at a batch it was not checked at."""
    model, x, _ = slim_models[name]
    dynamic = name == "channel-select"
    for fmt in deploy.FORMATS:
        r = exported[name, fmt]
        assert r["format"] == fmt and os.path.getsize(r["file"]) == r["bytes"] and r["dynamic_batch"] == dynamic
        assert r["traced_batch"] == 2 and r["batch_sizes"] == ([2, 5] if dynamic else [2])
        assert [c["batch_size"] for c in r["checks"]] == r["batch_sizes"]
        for c in r["checks"]:  # atol 1e-4 plus rtol 1e-4 of the output's scale
            assert c["tolerance"] == pytest.approx(1e-4 + 1e-4 * c["max_abs_ref"])
            assert c["max_abs_diff"] <= c["tolerance"]
        assert r["torch"] == torch.__version__
    onnx_record = exported[name, "onnx"]
    assert onnx_record["opset"] == deploy.OPSET and onnx_record["onnxruntime"] == onnxruntime.__version__
    assert "dynamo=True" in onnx_record["exporter"]
    assert exported[name, "pt2"]["opset"] is None and "onnxruntime" not in exported[name, "pt2"]
    proto = onnx.load(onnx_record["file"])
    assert [o.version for o in proto.opset_import if o.domain == ""] == [deploy.OPSET]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert (batch_dim.dim_param == "batch") if dynamic else (batch_dim.dim_value == 2)
    session = onnxruntime.InferenceSession(onnx_record["file"], providers=["CPUExecutionProvider"])
    x_new = torch.randn(3 if dynamic else 2, *x.shape[1:])
    got = torch.from_numpy(session.run(None, {"input": x_new.numpy()})[0])
    ref = _torch_out(model, x_new)
    assert (got - ref).abs().max().item() <= 1e-4 + 1e-4 * ref.abs().max().item()


def test_pt2_loads_without_slimrarts(exported, slim_models, tmp_path):
    """Each .pt2 is loaded by torch.export.load in a fresh interpreter where `import slimrarts` fails and the repo is
    not on the path; its outputs (the dynamic one at batch 1 and 3) equal PyTorch's."""
    inputs = {"channel-select": [torch.randn(b, 3, 32, 32) for b in (1, 3)], "grouped": [torch.randn(2, 3, 16, 16)]}
    torch.save(inputs, tmp_path / "inputs.pt")
    files = {name: exported[name, "pt2"]["file"] for name in slim_models}
    code = (
        "import sys\n"
        "sys.modules['slimrarts'] = None  # any import of slimrarts now fails\n"
        "import json, torch\n"
        f"files = json.loads({json.dumps(json.dumps(files))})\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "outs = {n: [torch.export.load(f).module()(x) for x in inputs[n]] for n, f in files.items()}\n"
        f"torch.save(outs, {str(tmp_path / 'outputs.pt')!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('slimrarts')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "['slimrarts']"  # only the blocked entry: nothing of slimrarts was loaded
    outs = torch.load(tmp_path / "outputs.pt")
    for name, (model, _, _) in slim_models.items():
        for x, got in zip(inputs[name], outs[name], strict=True):
            ref = _torch_out(model, x)
            assert (got - ref).abs().max().item() <= 1e-4 + 1e-4 * ref.abs().max().item()


def _perturbed_onnx(path) -> bytes:
    proto = onnx.load(path)
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 0.5, init.name))
    return proto.SerializeToString()


def _perturbed_pt2(path) -> bytes:
    program = torch.export.load(path)
    weight = max((v for v in program.state_dict.values() if v.is_floating_point()), key=lambda v: v.numel())
    with torch.no_grad():
        weight.add_(0.5)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", deploy.FORMATS)
def test_a_file_that_disagrees_with_pytorch_is_a_named_error_and_not_written(exported, slim_models, tmp_path,
                                                                            monkeypatch, fmt):
    model, x, _ = slim_models["channel-select"]
    bad = (_perturbed_onnx if fmt == "onnx" else _perturbed_pt2)(exported["channel-select", fmt]["file"])
    monkeypatch.setattr(deploy, f"_{fmt}_bytes", lambda *args: bad)  # the exporter's output, one weight off
    target = tmp_path / f"slim.{fmt}"
    with pytest.raises(ExportMismatchError, match=r"max \|Δ\| .* > tolerance .*not written") as err:
        slimrarts.export(model, target, x, format=fmt, dynamic_batch=True)
    assert f"the {fmt} export" in str(err.value) and "atol 0.0001 + rtol 0.0001" in str(err.value)
    assert isinstance(err.value, RuntimeError) and err.value.exit_code == 2
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no temporary file left either


def test_missing_deploy_extra_names_it(slim_models, tmp_path, monkeypatch, capsys):
    model, x, spec = slim_models["channel-select"]
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(MissingExtraError, match=r'missing: onnxruntime\): pip install "slimrarts\[deploy\]"') as err:
        slimrarts.export(model, tmp_path / "slim.onnx", x, format="onnx")
    assert isinstance(err.value, ImportError)
    save_slim(tmp_path / "slim.pt", model, spec, {"name": "tiny_preresnet", "num_classes": 10, "kwargs": {}})
    assert main(["export", str(tmp_path / "slim.pt"), "--format", "onnx"]) == 2
    assert 'pip install "slimrarts[deploy]"' in capsys.readouterr().err
    assert not (tmp_path / "slim.onnx").exists()


def test_bad_export_arguments_are_named(slim_models, tmp_path):
    model, x, _ = slim_models["grouped"]
    with pytest.raises(InputError, match="format='tflite'.*allowed: onnx, pt2"):
        slimrarts.export(model, tmp_path / "m", x, format="tflite")
    with pytest.raises(InputError, match="fixed-batch export runs at the batch of example_input"):
        slimrarts.export(model, tmp_path / "m", x, format="pt2", check_inputs=[x[:1]])
    with pytest.raises(InputError, match="batches of at least two sizes"):
        slimrarts.export(model, tmp_path / "m", x, format="pt2", dynamic_batch=True, check_inputs=[x, x])
    with pytest.raises(InputError, match="float32"):
        slimrarts.export(model, tmp_path / "m", x.double(), format="pt2")
    assert deploy.check_batch_sizes(1, True) == (2, [1, 3]) and deploy.check_batch_sizes(4, False) == (4, [4])


# ------------------------------------------------------------------------------------ model_info and the CLI


@pytest.fixture(scope="module")
def api_run(tmp_path_factory, tiny_sets):
    """A zoo model pruned through the API, with its own loaders and no model_info=."""
    run = tmp_path_factory.mktemp("api") / "run"
    torch.manual_seed(0)
    result = slimrarts.prune(create_model("tiny_preresnet"), tiny_loaders(tiny_sets), 0.4, config=TINY, run_dir=run,
                             progress=False)
    return run, result


def test_prune_records_model_info_so_load_needs_no_model(api_run):
    run, result = api_run
    info = {"name": "tiny_preresnet", "num_classes": 10, "kwargs": {}}
    assert json.loads((run / "width_spec.json").read_text())["model"] == info
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(slimrarts.load(run)(x), _torch_out(result.model, x))


def test_an_explicit_model_info_wins_and_the_tag_survives_copies(tiny_sets, monkeypatch):
    seen = []

    def stop(*args, **kwargs):
        seen.append(kwargs["model_info"])
        raise KeyboardInterrupt  # nothing past prepare is needed

    monkeypatch.setattr(api, "prepare", stop)
    model = copy.deepcopy(create_model("tiny_preresnet", num_classes=10, widths=[4, 6, 8]))
    for given in ({"name": "mine", "num_classes": 10}, None):
        with pytest.raises(KeyboardInterrupt):
            slimrarts.prune(model, tiny_loaders(tiny_sets), 0.4, config=TINY, progress=False, model_info=given)
    assert seen == [{"name": "mine", "num_classes": 10},
                    {"name": "tiny_preresnet", "num_classes": 10, "kwargs": {"widths": [4, 6, 8]}}]


def test_model_info_of_models_built_directly_by_timm_and_torchvision():
    import timm

    assert infer_model_info(timm.create_model("resnet18", num_classes=3)) == {
        "name": "timm:resnet18", "num_classes": 3, "kwargs": {}}
    assert infer_model_info(torchvision.models.mobilenet_v3_small(num_classes=5)) == {
        "name": "torchvision:mobilenet_v3_small", "num_classes": 5, "kwargs": {}}
    assert infer_model_info(torchvision.models.squeezenet1_1(num_classes=6))["num_classes"] == 6  # a conv head
    # unsure: a changed head, a changed zoo model, another input width, a model of one's own
    changed = torchvision.models.mobilenet_v3_small(num_classes=3)
    changed.classifier = nn.Sequential(nn.Linear(576, 3))
    zoo = create_model("tiny_resnet")
    zoo.fc = nn.Linear(zoo.fc.in_features, 3)
    for model in (changed, zoo, timm.create_model("resnet18", in_chans=1), TinyGrouped()):
        assert infer_model_info(model) is None


def test_load_a_torchvision_model_cut_without_naming_it(tmp_path):
    """A torchvision model built directly, cut and saved with what prune() would infer, loads without model=."""
    torch.manual_seed(0)
    model = calibrated_bn(torchvision.models.mobilenet_v2(num_classes=3), 32)
    info = infer_model_info(model)
    assert info == {"name": "torchvision:mobilenet_v2", "num_classes": 3, "kwargs": {}}
    x = torch.randn(2, 3, 32, 32)
    spec = _cut(model, x, "internal")
    save_slim(tmp_path / "slim.pt", model, spec, info)
    torch.testing.assert_close(slimrarts.load(tmp_path / "slim.pt")(x), _torch_out(model, x))


def test_load_without_model_info_says_what_to_pass(slim_models, tmp_path):
    model, _, spec = slim_models["channel-select"]
    save_slim(tmp_path / "slim.pt", model, spec)
    with pytest.raises(InputError, match=r"slimrarts\.load\(path, model=YourModel\(\.\.\.\)\)"):
        slimrarts.load(tmp_path / "slim.pt")
    assert main(["export", str(tmp_path / "slim.pt"), "--format", "pt2"]) == 2


def test_cli_export_checks_on_the_runs_test_images_and_records_each_export(tmp_path, tiny_archive, capsys):
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    run = tmp_path / "run"
    assert main(["run", recipe, "--out", str(run), "--no-progress", "--set", "search.epochs=1",
                 "--set", "finetune.epochs=1", "--set", "report.latency=false"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {run / 'slim.onnx'}" in printed and f"recorded in {run / 'export.json'}" in printed
    assert main(["export", str(run / "slim.pt"), "--format", "pt2", "--dynamic-batch", "--out",
                 str(tmp_path / "deploy.pt2")]) == 0
    first, second = json.loads((run / "export.json").read_text())
    assert first["format"] == "onnx" and first["file"] == str(run / "slim.onnx") and (run / "slim.onnx").is_file()
    assert first["inputs"].startswith("8 test images of cifar10") and tiny_archive in first["inputs"]
    assert not first["dynamic_batch"] and first["batch_sizes"] == [1] and len(first["checks"]) == 8
    assert first["opset"] == deploy.OPSET and first["max_abs_diff"] <= first["tolerance"]
    assert second["format"] == "pt2" and second["dynamic_batch"] and second["batch_sizes"] == [1, 3]
    assert second["file"] == str(tmp_path / "deploy.pt2") and (tmp_path / "deploy.pt2").is_file()
    # the images checked are the run's: its first test images as its test loader gave them
    images, _ = export_cmd.check_images(run, 8)
    session = onnxruntime.InferenceSession(str(run / "slim.onnx"), providers=["CPUExecutionProvider"])
    model = slimrarts.load(run)
    for row in images.split(1):
        ref = _torch_out(model, row)
        got = torch.from_numpy(session.run(None, {"input": row.numpy()})[0])
        assert (got - ref).abs().max().item() <= 1e-4 + 1e-4 * ref.abs().max().item()
    assert foreign_entries(run) == []  # `--force` may clear the export's files with the rest of the run


def test_cli_int8_export_is_calibrated_on_training_images_and_reports_accuracy_and_latency(tmp_path, tiny_archive,
                                                                                          capsys):
    """`slimrarts export RUN --int8 --calibration 30`: slim.int8.onnx (QDQ, int8 weights per channel) beside
    slim.onnx, its test accuracy next to the fp32 file's (both in onnxruntime, the whole tiny test set, each equal
    to what its own session computes), its latency at batch 1 and 64, and the settings, in export.json."""
    recipe = write_tiny_recipe(tmp_path, tiny_archive)
    run = tmp_path / "run"
    assert main(["run", recipe, "--out", str(run), "--no-progress", "--set", "search.epochs=1",
                 "--set", "finetune.epochs=1", "--set", "report.latency=false"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--int8", "--calibration", "30", "--dynamic-batch"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {run / 'slim.int8.onnx'} (int8 QDQ" in printed and "test accuracy in onnxruntime: fp32" in printed
    (record,) = json.loads((run / "export.json").read_text())
    q = record["int8"]
    assert q["calibration_images"] == 30 and q["per_channel"] and q["format"] == "QDQ"
    errors = {k: v["relative_error"] for k, v in q["activation_choice"].items()}
    assert errors.keys() == {"int8", "uint8"} and q["activation_type"] == _auto_pick(errors, q)
    assert f"(int8 QDQ, {q['activation_type']} activations" in printed
    assert "uint8 activations: relative |Δ| to fp32" in printed
    assert q["reduce_range"] == (not q["cpu_vnni"])  # 7-bit weights only where int8 dot products can saturate
    proto = onnx.load(str(run / "slim.int8.onnx"))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert q["bytes"] < q["fp32_bytes"]  # int8 weights (a tiny net: its graph is much of the file)
    test = list(make_loaders_of(run))
    for kind, path in (("fp32", run / "slim.onnx"), ("int8", run / "slim.int8.onnx")):
        acc = q["accuracy"][kind]
        assert acc["images"] == sum(y.shape[0] for _, y in test) == 80
        assert acc["acc"] == pytest.approx(deploy.onnx_accuracy(path.read_bytes(), test)["acc"])
    assert [r["batch"] for r in q["latency"]["runs"]] == [1, 64]
    assert all(r["fp32_s"] > 0 and r["int8_s"] > 0 for r in q["latency"]["runs"])
    assert q["latency"]["runtime"]["runtime"] == "onnxruntime"
    assert foreign_entries(run) == []


def _zero_point_types(data: bytes) -> set[int]:
    proto = onnx.load_from_string(data)
    consts = {t.name: t.data_type for t in proto.graph.initializer}
    return {consts[n.input[2]] for n in proto.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2
            and n.input[0] == proto.graph.input[0].name}


def _auto_pick(errors: dict[str, float], record: dict) -> str:
    """auto's rule, written out: the closer type; on x86 unsigned unless signed's error is under half of it."""
    if record["cpu_avx2"]:
        return "int8" if errors["int8"] < 0.5 * errors["uint8"] else "uint8"
    return min(errors, key=errors.get)


def test_on_x86_auto_keeps_unsigned_unless_signed_is_clearly_closer():
    from slimrarts.deploy import _choose_activations

    def pick(e8, eu, x86=True):
        return _choose_activations({"int8": {"relative_error": e8}, "uint8": {"relative_error": eu}}, x86=x86)

    assert pick(0.030, 0.026) == "uint8" and pick(0.020, 0.026) == "uint8"  # S8S8 a little closer: still U8S8
    assert pick(0.010, 0.026) == "int8"  # clearly closer
    assert pick(0.020, 0.026, x86=False) == "int8"  # elsewhere the closer one


def test_int8_activations_auto_keeps_the_type_closer_to_fp32(slim_models):
    """auto quantizes with signed and unsigned activations and keeps the one whose outputs on the calibration
    batches are closer to fp32's (both measured and recorded); an explicit type is used as asked."""
    model, x, _ = slim_models["channel-select"]
    data = deploy.OnnxSession(model.eval(), tuple(x.shape[1:])).bytes
    calib = [torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(i)) for i in range(2)]
    auto, rec = deploy.quantize_int8(data, calib)
    assert rec["activations_asked"] == "auto" and rec["activation_choice"].keys() == {"int8", "uint8"}
    errors = {k: v["relative_error"] for k, v in rec["activation_choice"].items()}
    assert rec["activation_type"] == _auto_pick(errors, rec) and all(0 <= e < 1 for e in errors.values())
    for kind, dtype in (("int8", onnx.TensorProto.INT8), ("uint8", onnx.TensorProto.UINT8)):
        one, r = deploy.quantize_int8(data, calib, activations=kind)
        assert r["activation_type"] == kind and r["activation_choice"] == {}
        assert _zero_point_types(one) == {dtype}  # the input's activations really are of that type
        if kind == rec["activation_type"]:
            assert one == auto
    with pytest.raises(InputError, match="activations 'int4' is not one of auto, int8, uint8"):
        deploy.quantize_int8(data, calib, activations="int4")


def make_loaders_of(run):
    loaders, _ = export_cmd._run_loaders(run, 256)
    return [(x.float(), y) for x, y in loaders.test]


def test_int8_needs_onnx_and_the_runs_data(api_run, tmp_path):
    run, _ = api_run
    with pytest.raises(InputError, match=r"--int8 .* needs --format onnx, not pt2"):
        export_cmd.export_run(run, format="pt2", int8=True)
    with pytest.raises(InputError, match=r"--calibration 0 must be an integer >= 1"):
        export_cmd.export_run(run, int8=True, calibration=0)
    bare = tmp_path / "model.pt"
    bare.write_bytes((run / "slim.pt").read_bytes())
    with pytest.raises(InputError, match=r"--int8 calibrates on the run's training images, but .*model\.pt has no "
                                         r"run folder"):
        export_cmd.export_run(bare, int8=True)


def test_cli_export_without_the_runs_data_says_it_used_random_inputs(api_run, tmp_path):
    """A run given its own loaders (its recipe.yaml does not describe them), and a bare slim.pt: random inputs of
    the recorded input size, and the record says why."""
    run, _ = api_run
    assert main(["export", str(run), "--format", "pt2"]) == 0
    (record,) = json.loads((run / "export.json").read_text())
    assert record["inputs"].startswith("8 random normal inputs (seed 0) of the recorded input size [3, 32, 32]")
    assert "its own loaders" in record["inputs"]
    bare = tmp_path / "model.pt"
    bare.write_bytes((run / "slim.pt").read_bytes())
    x, what = export_cmd._inputs(bare, None, 8)
    assert x.shape == (8, 3, 32, 32) and what.endswith("no run folder (recipe.yaml) beside slim.pt")
