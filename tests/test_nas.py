"""DARTS cell search: operations, genotypes and their derivation, nets, op costs, one step of every method, commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from slimrarts.commands import load_nas_recipe, search_command, train_command
from slimrarts.config import ConfigError
from slimrarts.metrics import count_params
from slimrarts.nas import (
    DARTS_V2,
    PRIMITIVES,
    Genotype,
    SearchNetwork,
    build_eval_net,
    cost_penalty,
    count_params_no_aux,
    count_skips,
    derive,
    load_genotype,
    op_costs,
    parse_genotype,
)
from slimrarts.nas.eval_net import drop_path
from slimrarts.nas.operations import make_op
from slimrarts.recipe import ArchOptimConfig, OptimConfig
from slimrarts.search import get_search
from slimrarts.search.problem import NetProblem, make_state

OP = {name: k for k, name in enumerate(PRIMITIVES)}
RECIPES = Path(__file__).resolve().parent.parent / "recipes"


# ---- evaluation net ------------------------------------------------------------------------------------------------

def test_darts_v2_eval_net_has_3_3m_params_without_the_auxiliary_head():
    net = build_eval_net("darts_v2", num_classes=10, C=36, layers=20, auxiliary=True)
    n = count_params_no_aux(net)
    assert n == pytest.approx(3.3e6, rel=0.02)
    assert n == 3_349_342  # the count DARTS' own code logs for this net
    aux = sum(p.numel() for p in net.auxiliary_head.parameters())
    assert count_params(net) == n + aux
    assert count_params(build_eval_net(DARTS_V2, auxiliary=False)) == n


def test_eval_net_outputs_and_drop_path():
    net = build_eval_net(DARTS_V2, num_classes=10, C=4, layers=3, auxiliary=True, drop_path=0.3)
    x = torch.randn(4, 3, 32, 32)
    out = net.train()(x)
    assert isinstance(out, tuple) and [o.shape for o in out] == [(4, 10), (4, 10)]
    net.eval()
    assert torch.equal(net(x), net(x))
    assert build_eval_net(DARTS_V2, C=4, layers=3, auxiliary=False).train()(x).shape == (4, 10)
    net.set_drop_path(0.1)
    assert net.drop_path_prob.item() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="drop-path"):
        net.set_drop_path(1.0)
    torch.manual_seed(0)
    h = torch.ones(10000, 1, 1, 1)
    dropped = drop_path(h, 0.25)
    kept = dropped[dropped > 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.05)


# ---- operations ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_op_keeps_channels_and_applies_the_stride(name, stride):
    op = make_op(name, 4, stride, affine=False, search=True)
    assert op(torch.randn(2, 4, 8, 8)).shape == (2, 4, 8 // stride, 8 // stride)


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="sep_conv_7x7"):
        make_op("sep_conv_7x7", 4, 1, affine=True)


# ---- genotypes -----------------------------------------------------------------------------------------------------

def _alpha(entries: dict[int, dict[str, float]]) -> torch.Tensor:
    a = torch.zeros(14, len(PRIMITIVES))
    for edge, logits in entries.items():
        for name, value in logits.items():
            a[edge, OP[name]] = value
    return a


def test_derive_keeps_two_strongest_inputs_by_best_non_none_softmax_weight():
    normal = _alpha({
        0: {"none": 5.0, "sep_conv_3x3": 1.0},  # none wins the softmax, must be ignored: sep_conv_3x3
        1: {"skip_connect": 1.0},
        2: {"max_pool_3x3": 3.0}, 4: {"dil_conv_3x3": 2.0},  # node 1: edge 3 (input 1) is uniform and loses
        5: {"none": 8.0, "avg_pool_3x3": 6.0}, 6: {"sep_conv_5x5": 3.5}, 8: {"skip_connect": 4.0},
        9: {"sep_conv_3x3": 2.0}, 13: {"dil_conv_5x5": 2.5},
    })
    # node 1 of the reduction cell: raw logits would keep inputs 0 and 2; softmax weights keep 1 and 0
    others = {name: 2.9 for name in PRIMITIVES if name not in ("none", "sep_conv_5x5")}
    reduce = _alpha({2: {**others, "sep_conv_5x5": 3.0}, 3: {"dil_conv_5x5": 2.0},
                     4: {**{n: 2.9 for n in PRIMITIVES}, "avg_pool_3x3": 2.95}})
    g = derive(normal, reduce)
    assert g.normal == (("skip_connect", 1), ("sep_conv_3x3", 0),  # strongest first
                        ("max_pool_3x3", 0), ("dil_conv_3x3", 2),
                        ("skip_connect", 3), ("sep_conv_5x5", 1),
                        ("dil_conv_5x5", 4), ("sep_conv_3x3", 0))
    assert g.reduce[2:4] == (("dil_conv_5x5", 1), ("sep_conv_5x5", 0))
    # uniform α: ties go to the first non-none op and the lowest input indices
    assert g.reduce[:2] == (("max_pool_3x3", 0), ("max_pool_3x3", 1))
    assert g.normal_concat == g.reduce_concat == (2, 3, 4, 5)
    assert count_skips(g) == 2 and count_skips(g, "both") == 2


def test_derive_checks_shapes():
    with pytest.raises(ValueError, match=r"\(14, 8\)"):
        derive(torch.zeros(10, 8), torch.zeros(14, 8))


def test_genotype_json_and_text_round_trip(tmp_path):
    g = derive(torch.randn(14, 8), torch.randn(14, 8))
    for genotype in (DARTS_V2, g):
        assert Genotype.from_json(genotype.to_json()) == genotype
        assert parse_genotype(str(genotype)) == genotype
        assert load_genotype(genotype.to_dict()) == genotype
    (tmp_path / "g.json").write_text(g.to_json(indent=1))
    (tmp_path / "g.txt").write_text(str(g) + "\n")
    assert load_genotype(tmp_path / "g.json") == load_genotype(str(tmp_path / "g.txt")) == g
    assert load_genotype("DARTS_V2") == DARTS_V2
    with pytest.raises(FileNotFoundError, match="darts_v2"):
        load_genotype(tmp_path / "missing.json")
    darts_text = ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                  "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
                  "('dil_conv_3x3', 2)], normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), "
                  "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
                  "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))")
    assert parse_genotype(darts_text) == DARTS_V2
    assert count_skips(DARTS_V2) == 2 and count_skips(DARTS_V2, "reduce") == 3


@pytest.mark.parametrize("bad, match", [
    ({"normal": [["conv_9x9", 0], ["sep_conv_3x3", 1]]}, "conv_9x9"),
    ({"normal": [["sep_conv_3x3", 0], ["sep_conv_3x3", 2]]}, "node 0 can read states 0..1"),
    ({"normal": [["none", 0], ["sep_conv_3x3", 1]]}, "'none' is not allowed"),
    ({"normal_concat": [2, 9]}, "normal_concat"),
])
def test_bad_genotypes_are_refused(bad, match):
    data = {**DARTS_V2.to_dict(), **bad}
    with pytest.raises(ValueError, match=match):
        Genotype.from_dict(data)


def test_genotype_text_is_parsed_without_evaluating_code():
    with pytest.raises(ValueError, match="not a literal"):
        parse_genotype("Genotype(normal=__import__('os').getcwd(), normal_concat=[2], reduce=[], reduce_concat=[2])")


# ---- search net ----------------------------------------------------------------------------------------------------

def test_search_net_alphas_are_not_module_parameters_and_follow_to():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=2)
    assert [tuple(a.shape) for a in net.arch] == [(14, 8), (14, 8)]
    assert all(a.is_leaf and a.requires_grad for a in net.arch)
    assert float(net.arch[0].detach().abs().max()) < 1e-2  # 1e-3 · N(0, 1)
    ids = {id(p) for p in net.parameters()} | {id(b) for b in net.buffers()}
    assert not any(id(a) in ids for a in net.arch) and "arch" not in str(list(net.state_dict()))
    a0 = net.arch[0]
    net.to(torch.float64)
    assert net.arch[0] is a0 and a0.dtype == torch.float64
    net.to(torch.float32)
    # functional_call swaps the weights but every pass reads the same α
    x = torch.randn(2, 3, 32, 32)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())
    out = functional_call(net, (params, buffers), (x,))
    (g,) = torch.autograd.grad(out.sum(), [net.arch[1]])
    assert g.abs().sum() > 0


def _tiny_search(method: str):
    torch.manual_seed(0)
    net = SearchNetwork(C=4, num_classes=10, layers=3)  # cell 0 normal, cells 1 and 2 reduction
    problem = NetProblem(net, net.arch)
    state = make_state(net, net.arch, method, optim_w=OptimConfig(lr=0.025, momentum=0.9, weight_decay=3e-4),
                       optim_arch=ArchOptimConfig(lr=3e-3, betas=[0.5, 0.999], weight_decay=0.0), beta=1e-3)
    g = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))  # noqa: E731
    return net, problem, state, batch(), batch()


@pytest.mark.parametrize("method", ["darts1", "darts2", "milenas", "rarts", "rarts-jacobi"])
def test_one_search_step_of_each_method_moves_alpha(method):
    net, problem, state, batch_t, batch_v = _tiny_search(method)
    a0 = [a.detach().clone() for a in net.arch]
    w0 = {k: v.detach().clone() for k, v in state.w.items()}
    get_search(method).step(problem, state, batch_t, batch_v)
    assert not torch.equal(a0[0], net.arch[0]) and not torch.equal(a0[1], net.arch[1])
    assert all(torch.isfinite(a).all() for a in net.arch)
    assert any(not torch.equal(w0[k], state.w[k]) for k in w0)
    assert net.genotype() is not None


# ---- costs ---------------------------------------------------------------------------------------------------------

def test_macs_proxy_orders_ops_on_a_normal_edge():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, layers=3)  # cells: normal, reduce, reduce
    costs = op_costs(net, "macs")
    row = costs.raw_normal[0]
    assert row[OP["sep_conv_5x5"]] > row[OP["sep_conv_3x3"]] > row[OP["skip_connect"]] == 0
    assert row[OP["none"]] == 0
    assert costs.raw_reduce[0, OP["skip_connect"]] > 0  # a factorized reduction on a stride-2 edge
    # normalised: the mean over all non-none entries is 1
    cols = [OP[n] for n in PRIMITIVES if n != "none"]
    assert torch.cat([costs.normal[:, cols], costs.reduce[:, cols]]).mean().item() == pytest.approx(1.0, rel=1e-5)


def test_latency_table_is_measured_once_and_cached(tmp_path):
    torch.manual_seed(0)
    net = SearchNetwork(C=4, layers=2)
    first = op_costs(net, "latency", warmup=1, repeats=2)
    assert first.unit == "ms" and first.raw_reduce.shape == (14, 8)
    assert (first.raw_reduce[:, OP["none"]] == 0).all() and (first.raw_reduce[:, OP["sep_conv_3x3"]] > 0).all()
    assert len(list((tmp_path / "cache" / "latency").glob("ops-*.json"))) == 1
    again = op_costs(net, "latency", warmup=1, repeats=2)
    assert torch.equal(first.raw_reduce, again.raw_reduce)  # read from the cache, not measured again


def test_cost_penalty_gradient_pushes_alpha_away_from_expensive_ops():
    torch.manual_seed(0)
    net = SearchNetwork(C=4, layers=3)
    costs = op_costs(net, "macs")
    penalty = cost_penalty(net.arch, [costs.normal, costs.reduce], mu=0.002)
    grads = torch.autograd.grad(penalty(), net.arch)
    g = grads[0][0]
    assert g[OP["sep_conv_5x5"]] > g[OP["sep_conv_3x3"]] > 0 > g[OP["skip_connect"]]
    p0 = torch.softmax(net.arch[0].detach(), -1)[0]
    with torch.no_grad():
        for a, ga in zip(net.arch, grads, strict=True):
            a -= 100.0 * ga
    p1 = torch.softmax(net.arch[0].detach(), -1)[0]
    assert p1[OP["sep_conv_5x5"]] < p0[OP["sep_conv_5x5"]] and p1[OP["skip_connect"]] > p0[OP["skip_connect"]]
    with pytest.raises(ValueError, match="shape"):
        cost_penalty(net.arch, [costs.normal[:3], costs.reduce], mu=0.002)


# ---- recipes and commands ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(RECIPES.glob("darts_*.yaml")), ids=lambda p: p.name)
def test_darts_recipes_load(path):
    recipe = load_nas_recipe(path)
    assert recipe.net.C % 2 == 0 and recipe.search.epochs >= 1


def test_paper_recipe_has_darts_settings():
    r = load_nas_recipe(RECIPES / "darts_paper.yaml")
    s, t = r.search, r.train
    assert (s.epochs, r.data.batch_size, s.optim.lr, s.optim.min_lr, s.optim.momentum, s.optim.weight_decay) == (
        50, 64, 0.025, 0.001, 0.9, 3e-4)
    a = s.optim_arch
    assert (a.optimizer, a.lr, a.betas, a.weight_decay) == ("adam", 3e-4, [0.5, 0.999], 1e-3)
    assert (t.epochs, t.C, t.layers, t.batch_size, t.auxiliary_weight, t.drop_path, t.cutout) == (
        600, 36, 20, 96, 0.4, 0.2, 16)


def _recipe(archive: str, **search) -> dict:
    return {"name": "t", "device": "cpu",
            "data": {"root": archive, "batch_size": 50, "eval_batch_size": 100},
            "search": {"method": "darts1", "epochs": 1, "log_every": 1,
                       "optim": {"lr": 0.025, "momentum": 0.9, "weight_decay": 3e-4, "schedule": "cosine"}, **search},
            "net": {"C": 4, "layers": 2}, "cost": {"mode": "macs", "mu": 0.002},
            "train": {"epochs": 1, "batch_size": 50, "C": 4, "layers": 3, "cutout": 0,
                      "optim": {"lr": 0.025, "momentum": 0.9, "weight_decay": 3e-4, "schedule": "cosine"}}}


def test_search_command_writes_the_run_and_resumes(tiny_archive, tmp_path):
    out = tmp_path / "run"
    assert search_command(_recipe(tiny_archive, epochs=2), out=out, progress=False) == 0
    for name in ("recipe.yaml", "metrics.jsonl", "genotype.json", "genotype.txt", "alphas.json", "costs.json",
                 "report.json", "checkpoints/search.pt"):
        assert (out / name).exists(), name
    g = Genotype.from_json((out / "genotype.json").read_text())
    assert parse_genotype((out / "genotype.txt").read_text()) == g
    report = json.loads((out / "report.json").read_text())
    assert report["skip_connections"]["normal"] == count_skips(g)
    assert report["eval_net"]["params"] == count_params_no_aux(build_eval_net(g, C=4, layers=3))
    with pytest.raises(FileExistsError):
        search_command(_recipe(tiny_archive, epochs=2), out=out, progress=False)
    with pytest.raises(ConfigError, match="search.epochs"):  # a resume must not change the experiment
        search_command(_recipe(tiny_archive, epochs=3), out=out, resume=True, progress=False)
    assert search_command(_recipe(tiny_archive, epochs=2), out=out, resume=True, progress=False) == 0
    alphas = json.loads((out / "alphas.json").read_text())
    assert [e["epoch"] for e in alphas["epochs"]] == [0, 1]
    assert len(alphas["epochs"][1]["softmax"]["reduce"]) == 14


def test_train_command_trains_the_eval_net_of_a_genotype(tiny_archive, tmp_path):
    out = tmp_path / "train"
    assert train_command(_recipe(tiny_archive), out=out, progress=False, genotype="darts_v2") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["auxiliary_weight"] == 0.4
    saved = torch.load(out / "model.pt", weights_only=True)
    info = json.loads(saved["model"])
    net = build_eval_net(info["kwargs"]["genotype"], num_classes=info["num_classes"], C=info["kwargs"]["C"],
                         layers=info["kwargs"]["layers"], auxiliary=info["kwargs"]["auxiliary"])
    net.load_state_dict(saved["state_dict"])
    # the reported accuracy is the final epoch's, and it is the saved net's on the test set
    final = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert report["test_acc"] == final["test_acc"] and final["epoch"] == 0
    from slimrarts.data import make_loaders
    from slimrarts.engine import evaluate

    test = make_loaders(load_nas_recipe(_recipe(tiny_archive)).data, "cpu").test
    assert evaluate(net, test)["acc"] == report["test_acc"]
    with pytest.raises(ValueError, match="no genotype"):
        train_command(_recipe(tiny_archive), out=tmp_path / "other", progress=False)


def test_cli_search_then_train_the_found_genotype(tiny_archive, tmp_path):
    """`slimrarts cell-search <cell recipe>`, then `slimrarts train <recipe> --set model.genotype=<genotype.json>`."""
    import yaml

    from slimrarts.cli import main

    recipe = tmp_path / "cell.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_archive)))
    search = tmp_path / "search"
    assert main(["cell-search", str(recipe), "--out", str(search), "--no-progress"]) == 0
    found = Genotype.from_json((search / "genotype.json").read_text())
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the drawing needs the `plot` extra
        pass
    else:
        assert (search / "cells.png").stat().st_size > 1000
    train = tmp_path / "train"
    assert main(["train", str(recipe), "--out", str(train), "--no-progress",
                 "--set", f"model.genotype={search / 'genotype.json'}"]) == 0
    info = json.loads(torch.load(train / "model.pt", weights_only=True)["model"])
    assert Genotype.from_json(json.dumps(info["kwargs"]["genotype"])) == found
