"""`slimrarts.integrations.lightning.WidthSearchCallback` on a real Lightning `Trainer` (CPU, tiny data, a few
steps): α learned by the user's LightningModule, the cut at the end of fit, a second fit fine-tunes, checkpoints
saved after the cut reload; gradient accumulation and a GradScaler (issue 25)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_loaders, torchrun_script

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed (pip install "
                         "'slimrarts[lightning]'); make env installs it")

from lightning_ddp_worker import Classifier  # noqa: E402  (the LightningModule both tests train)

from slimrarts.errors import InputError  # noqa: E402
from slimrarts.integrations.lightning import WidthSearchCallback, load_slim_checkpoint  # noqa: E402
from slimrarts.models import create_model  # noqa: E402

CONFIG = {"seed": 0, "device": "cpu", "search": {"optim_arch": {"lr": 0.05}},
          "prune": {"scope": ["internal"], "mode": "ratio", "ratio": 0.4}, "report": {"latency": False}}


def _data(tiny_sets, batch: int = 25) -> torch.utils.data.DataLoader:
    batches = list(tiny_loaders(tiny_sets).train)
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=batch, shuffle=False)


def _trainer(callbacks, steps: int = 4, **kw) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw)


class _Masked(pl.Callback):
    """Before the search callback cuts: the gated model's output with the losers' α at 0 (eval mode)."""

    def __init__(self, search_cb, probe):
        self.cb, self.probe, self.out = search_cb, probe, None

    def on_train_end(self, trainer, pl_module):
        keep = self.cb.search.select()  # deterministic: the cut selects the same channels
        pl_module.eval()
        with torch.no_grad(), self.cb.search.gates.masked(keep):
            self.out = pl_module(self.probe)
        pl_module.train()


@pytest.mark.parametrize("method", ["joint", "slimming"])
def test_the_cut_at_the_end_of_fit_equals_the_masked_gated_model(tiny_sets, method):
    data = _data(tiny_sets)
    x = next(iter(data))[0][:8]
    module = Classifier()
    dense = sum(p.numel() for p in module.parameters())
    scope = ["internal", "branch-input"] if method == "slimming" else None  # slimming: gates on norms only
    cb = WidthSearchCallback(x, method=method, scope=scope, config=CONFIG, module="net", recalibrate=False)
    probe = torch.randn(4, 3, 32, 32)
    masked = _Masked(cb, probe)
    _trainer([masked, cb]).fit(module, data)
    assert cb.spec is not None and sum(p.numel() for p in module.parameters()) < dense
    if method == "joint":  # α was trained by the user's steps (slimming's scores are γ: α stays 1)
        assert any(not torch.equal(a, torch.ones_like(a)) for a in cb.search.alphas)
    else:  # the ℓ1 term did reach γ: a run without it ends with other γ
        plain = Classifier()
        config = {**CONFIG, "baselines": {"sparsity": 0.0}}
        _trainer([WidthSearchCallback(x, method=method, scope=scope, config=config, module="net",
                                      recalibrate=False)]).fit(plain, data)
        def gammas(m):
            return torch.cat([b.weight.detach().abs() for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)])

        assert not torch.equal(gammas(module).mean(), gammas(plain).mean())
    module.eval()
    with torch.no_grad():
        slim = module(probe)
    assert torch.allclose(slim, masked.out, atol=1e-5, rtol=1e-4)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())  # no gates left


def test_fine_tuning_is_a_second_fit_and_a_checkpoint_after_the_cut_reloads(tiny_sets, tmp_path):
    data = _data(tiny_sets)
    x = next(iter(data))[0][:8]
    module = Classifier()
    cb = WidthSearchCallback(x, config=CONFIG, module="net")  # recalibrated on the Trainer's training batches
    _trainer([cb], steps=3).fit(module, data)
    cut = copy.deepcopy(module.state_dict())
    trainer = _trainer([cb], steps=3)
    trainer.fit(module, data)  # the slim model, new optimizers: it trains, nothing is searched or cut again
    assert any(not torch.equal(cut[k], v) for k, v in module.state_dict().items())
    assert all(cut[k].shape == v.shape for k, v in module.state_dict().items())
    trainer.save_checkpoint(tmp_path / "slim.ckpt")
    again = load_slim_checkpoint(Classifier(), tmp_path / "slim.ckpt")
    module.eval(), again.eval()
    probe = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(probe), module(probe))
    with pytest.raises(RuntimeError, match="size mismatch"):  # what the width spec spares the user
        Classifier().load_state_dict(torch.load(tmp_path / "slim.ckpt", weights_only=True)["state_dict"])
    # another process resumes the fine-tuning: the slim module from the file, then fit from it (optimizer included)
    later = WidthSearchCallback(x, config=CONFIG, module="net")
    _trainer([later], steps=5).fit(again, data, ckpt_path=tmp_path / "slim.ckpt")
    assert later.spec == cb.spec and later.search is None  # nothing searched or cut again


def test_a_checkpoint_before_the_cut_resumes_the_search(tiny_sets, tmp_path):
    """A checkpoint saved mid-search (Lightning's ModelCheckpoint at an epoch's end) carries α and its optimizer,
    not the weights twice; a fit resumed from it ends with the α and the cut of the uninterrupted fit, exactly."""
    data = _data(tiny_sets, batch=100)  # 2 steps an epoch
    x = next(iter(data))[0][:8]

    def trainer(callbacks):
        return pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks)

    whole = WidthSearchCallback(x, config=CONFIG, module="net", recalibrate=False)
    saves = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                                         save_on_train_epoch_end=True)
    trainer([whole, saves]).fit(Classifier(), data)
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "WidthSearchCallback" in k)
    assert {"arch", "optim_arch"} <= set(state["search"]["search"]) and "w" not in state["search"]["search"]
    assert "slimrarts" not in ckpt  # before the cut: no width spec yet
    resumed = WidthSearchCallback(x, config=CONFIG, module="net", recalibrate=False)
    trainer([resumed, copy.deepcopy(saves)]).fit(Classifier(), data, ckpt_path=tmp_path / "epoch=0.ckpt")
    for a, b in zip(resumed.search.alphas, whole.search.alphas, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, torch.ones_like(a)) for a in whole.search.alphas)
    assert [g["kept"] for g in resumed.spec["groups"]] == [g["kept"] for g in whole.spec["groups"]]


class _Alphas(pl.Callback):
    def __init__(self, cb):
        self.cb, self.seen = cb, []

    def on_fit_start(self, trainer, pl_module):
        self.seen.append([a.detach().clone() for a in self.cb.search.alphas])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append([a.detach().clone() for a in self.cb.search.alphas])


def _changed(a, b) -> bool:
    return any(not torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_gradient_accumulation_steps_alpha_once_per_optimizer_step(tiny_sets):
    data = _data(tiny_sets, batch=10)
    cb = WidthSearchCallback(next(iter(data))[0][:8], config=CONFIG, module="net", recalibrate=False)
    record = _Alphas(cb)
    _trainer([cb, record], steps=2, accumulate_grad_batches=2).fit(Classifier(), data)
    seen = record.seen  # before training, then after each of the 4 micro-batches
    assert len(seen) == 5
    assert [_changed(seen[i], seen[i + 1]) for i in range(4)] == [False, True, False, True]


def test_a_grad_scaler_scales_alphas_gradients_too(tiny_sets):
    """fp16 autocast with a GradScaler (initial scale 2^16): α's step is divided by the scale as the weights'
    are, so it moves as much as in fp32, not 65536 times more."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    data = _data(tiny_sets)
    x = next(iter(data))[0][:8]
    moves = []
    config = {**CONFIG, "search": {"optim_arch": {"optimizer": "sgd", "lr": 0.05}}}  # a step ∝ the gradient
    for plugins in ([], [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]):
        cb = WidthSearchCallback(x, config=config, module="net", recalibrate=False)
        record = _Alphas(cb)
        _trainer([cb, record], steps=2, plugins=plugins).fit(Classifier(), data)
        moves.append(max((b - a).abs().max().item() for a, b in zip(record.seen[0], record.seen[-1], strict=True)))
    assert 0.7 * moves[0] < moves[1] < 1.4 * moves[0]  # fp16's rounding; undivided it would be 65536×


def test_regularize_divides_out_the_scale_and_skips_a_non_finite_step(tiny_sets):
    import slimrarts

    loaders = tiny_loaders(tiny_sets)
    xb, yb = next(iter(loaders.train))
    ends = []
    for scale in (None, 1024.0, float("inf")):
        search = slimrarts.WidthSearch(Classifier().net, xb[:8], method="joint", config=CONFIG)
        loss = F.cross_entropy(search.model(xb), yb) * (1.0 if scale is None else scale)
        loss.backward()
        stepped = search.regularize(grad_scale=scale)
        assert stepped is (scale != float("inf"))
        ends.append([a.detach().clone() for a in search.alphas])
    assert not _changed(ends[0], ends[1])  # a power of two: exactly the unscaled step
    assert all(torch.equal(a, torch.ones_like(a)) for a in ends[2])  # skipped: α as it started


def test_two_net_methods_are_refused_with_what_to_do():
    with pytest.raises(InputError, match="rarts.*WidthSearch.step in your own loop"):
        WidthSearchCallback(torch.randn(2, 3, 32, 32), method="rarts")


def test_a_checkpoint_without_a_width_spec_is_named(tiny_sets, tmp_path):
    torch.save({"state_dict": Classifier().state_dict()}, tmp_path / "dense.ckpt")
    with pytest.raises(InputError, match="holds no slimrarts width spec"):
        load_slim_checkpoint(Classifier(), tmp_path / "dense.ckpt")


def test_without_the_extra_the_import_names_it():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "try:\n    import slimrarts.integrations.lightning\n"
            "except ImportError as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("MissingExtraError") and "slimrarts[lightning]" in out


def test_the_lightning_example_runs_and_its_checkpoint_reloads_within_the_budget(tiny_sets, tmp_path):
    import importlib.util
    from pathlib import Path

    from slimrarts.metrics import macs_and_params

    path = Path(__file__).resolve().parents[1] / "examples" / "lightning_width_search.py"
    spec = importlib.util.spec_from_file_location("lightning_width_search", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    module = example.Classifier(create_model("tiny_preresnet"))
    dense, _ = macs_and_params(copy.deepcopy(module.net), (1, 3, 32, 32))
    example.search_cut_finetune(module, _data(tiny_sets), epochs=1, budget="60%", root=tmp_path,
                                checkpoint=tmp_path / "s.ckpt", enable_progress_bar=False, accelerator="cpu")
    after, _ = macs_and_params(copy.deepcopy(module.net), (1, 3, 32, 32))
    assert after <= 0.6 * dense * 1.01
    torch.manual_seed(1)  # another initialisation: the checkpoint's weights replace it
    again = load_slim_checkpoint(example.Classifier(create_model("tiny_preresnet")), tmp_path / "s.ckpt")
    probe = torch.randn(2, 3, 32, 32)
    module.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(again(probe), module(probe))


def test_a_resumed_slimming_fit_keeps_the_trained_gammas(tiny_sets, tmp_path):
    """Lightning loads the weights before the search is built: the resumed search must not set γ to init_gamma
    again; it ends where the uninterrupted fit ends."""
    data = _data(tiny_sets, batch=100)
    x = next(iter(data))[0][:8]
    scope = ["internal", "branch-input"]

    def trainer(callbacks):
        return pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=callbacks)

    whole = Classifier()
    saves = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                                         save_on_train_epoch_end=True)
    trainer([WidthSearchCallback(x, method="slimming", scope=scope, config=CONFIG, module="net",
                                 recalibrate=False), saves]).fit(whole, data)
    resumed = Classifier()
    trainer([WidthSearchCallback(x, method="slimming", scope=scope, config=CONFIG, module="net",
                                 recalibrate=False), copy.deepcopy(saves)]).fit(resumed, data,
                                                                                ckpt_path=tmp_path / "epoch=0.ckpt")
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_fit_takes_the_gates_off_and_a_new_fit_searches_again(tiny_sets):
    data = _data(tiny_sets)
    x = next(iter(data))[0][:8]

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raise KeyboardInterrupt

    module = Classifier()
    cb = WidthSearchCallback(x, config=CONFIG, module="net", recalibrate=False)
    with pytest.raises(BaseException):  # noqa: B017, PT011 - Lightning may rethrow it as its own
        _trainer([cb, Boom()]).fit(module, data)
    assert cb.search is None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())
    _trainer([cb], steps=2).fit(module, data)
    assert cb.spec is not None


def test_a_callback_that_cut_one_module_refuses_another(tiny_sets):
    data = _data(tiny_sets)
    cb = WidthSearchCallback(next(iter(data))[0][:8], config=CONFIG, module="net", recalibrate=False)
    _trainer([cb], steps=2).fit(Classifier(), data)
    with pytest.raises(InputError, match="has cut another module already"):
        _trainer([cb], steps=2).fit(Classifier(), data)


def test_several_training_loaders_ask_for_the_recalibration_batches(tiny_sets):
    class Two(Classifier):
        def training_step(self, batch, _):
            return sum(F.cross_entropy(self(x), y) for x, y in batch.values())

    data = _data(tiny_sets)
    cb = WidthSearchCallback(next(iter(data))[0][:8], config=CONFIG, module="net")
    with pytest.raises(InputError, match="several training loaders.*recalibrate=<an iterable"):
        _trainer([cb], steps=2).fit(Two(), {"a": data, "b": data})


def test_a_true_half_precision_is_refused_naming_the_mixed_ones(tiny_sets):
    data = _data(tiny_sets)
    cb = WidthSearchCallback(next(iter(data))[0][:8], config=CONFIG, module="net")
    with pytest.raises(InputError, match="use a mixed precision"):
        _trainer([cb], steps=1, precision="bf16-true").fit(Classifier(), data)


def test_under_lightnings_ddp_every_rank_ends_with_the_same_alpha_and_slim_model(tmp_path):
    """Trainer(strategy="ddp"), 2 gloo processes under torchrun: the gates go on after Lightning wrapped the model
    (its DDP averages the weights' gradients), `regularize` averages α's; the cut and the recalibrated
    statistics are the same on both ranks."""
    from pathlib import Path

    done = torchrun_script(Path(__file__).with_name("lightning_ddp_worker.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["kept"] == b["kept"]
    assert any(not torch.equal(t, torch.ones_like(t)) for t in a["alphas"])
    for p, q in zip(a["alphas"], b["alphas"], strict=True):
        assert torch.equal(p, q)
    assert a["slim"].keys() == b["slim"].keys() and all(torch.equal(a["slim"][k], b["slim"][k]) for k in a["slim"])


def test_a_module_without_forward_is_told_to_name_its_network(tiny_sets):
    class NoForward(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = create_model("tiny_preresnet")

        def training_step(self, batch, _):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = _data(tiny_sets)
    cb = WidthSearchCallback(next(iter(data))[0][:8], config=CONFIG)
    with pytest.raises(InputError, match="has no forward.*module='net'"):
        _trainer([cb], steps=1).fit(NoForward(), data)
    slim = WidthSearchCallback(next(iter(data))[0][:8], method="slimming", config=CONFIG, module="net")
    with pytest.raises(InputError, match=r"not a norm; choose scopes.*\[internal, branch-input\]"):
        _trainer([slim], steps=1).fit(Classifier(), data)
