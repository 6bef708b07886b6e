"""The package's shape: no import cycles, library modules that never load the command line, true dependency pins."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "slimrarts"
CLI_MODULES = ("slimrarts.cli", "slimrarts.commands", "slimrarts.__main__")  # the command layer and its entry point


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports, at top level or inside functions (deprecation shims in a module
    `__getattr__` and `if TYPE_CHECKING:` blocks excepted: they do not run when the module is used)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    shims = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
             for n in ast.walk(f)}
    shims |= {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and "TYPE_CHECKING" in ast.unparse(f.test)
              for n in ast.walk(f)}  # annotations only: never imported at run time
    out = set()
    for node in ast.walk(tree):
        if id(node) in shims:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in known and t != name)
    return out


def test_no_import_cycles():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " → ".join(cycle)


# The layers, lowest first: what each unit (a subpackage, or a module at the package root) may import from the
# package. The schema (`recipe`, `config`) loads no algorithm: `methods` imports the built-in ones by name when a
# method is first looked up. The search layer needs nothing from `width/`; `engine` nothing above itself.
FOUNDATION = {"version", "_io", "modes", "timing", "errors"}  # import only each other; every unit may import them
LAYERS: dict[str, set[str]] = {
    **{unit: set() for unit in FOUNDATION},
    "methods": set(),
    "config": set(),
    "engine": set(),
    "metrics": {"engine"},
    "data": {"engine"},
    "recipe": {"config", "data", "methods"},
    "search": {"engine", "methods"},
    "nas": {"config", "engine", "methods", "metrics", "recipe", "search"},
    "models": {"nas"},  # the zoo's DARTS evaluation net is built from the cell-search operations
    "width": {"deploy", "engine", "metrics", "search"},  # deploy: latency timed in onnxruntime
    "baselines": {"engine", "methods", "width"},
    "preflight": {"engine", "models"},
    "report": {"config", "engine", "metrics", "version"},
    "runs": {"metrics", "report"},
    "toy": {"engine", "search"},
    "runfolder": {"engine", "recipe"},  # opening a run folder: lock, fingerprint and settings checks, its record
    "deploy": set(),  # export and its check: torch, onnx and onnxruntime over the foundation only
    # your loop's object over the search machinery (prune() is built on it)
    "widthsearch": {"baselines", "config", "engine", "methods", "preflight", "recipe", "search", "width"},
    "integrations": {"methods", "width", "widthsearch"},  # other frameworks' hooks over WidthSearch (extras)
    "api": {"baselines", "config", "data", "deploy", "engine", "methods", "metrics", "models", "preflight", "recipe",
            "report", "runfolder", "search", "width", "widthsearch"},
    "commands": {"api", "config", "data", "deploy", "engine", "methods", "metrics", "models", "nas", "preflight",
                 "recipe", "runfolder", "version", "width"},
    "cli": {"commands", "config", "engine", "methods", "metrics", "models", "recipe", "report", "runs", "version"},
    "__main__": {"cli"},
    "slimrarts": {"api", "deploy", "version"},  # the package's __init__: the public names
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """`importer → imported` edges of a module graph that `LAYERS` does not allow (a unit missing from `LAYERS`
    is a violation too, so a new folder must be placed in the order)."""
    bad = []
    for name, targets in sorted(graph.items()):
        unit = _unit(name)
        if unit not in LAYERS:
            bad.append(f"{name}: unit {unit!r} has no place in LAYERS")
            continue
        allowed = LAYERS[unit] | FOUNDATION
        bad += [f"{name} → {t}" for t in sorted(targets) if _unit(t) != unit and _unit(t) not in allowed]
    return bad


def test_imports_follow_the_layers():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, path, known) for name, path in modules.items()}
    assert layer_violations(graph) == []


def test_the_layer_check_names_a_forbidden_import():
    """The check itself: the schema importing an algorithm, search importing width/, and an unplaced folder fail."""
    graph = {"slimrarts.recipe": {"slimrarts.config", "slimrarts.search.base"},
             "slimrarts.search.problem": {"slimrarts.width.select", "slimrarts.engine.optim"},
             "slimrarts.width.gates": {"slimrarts.search.base"},
             "slimrarts.plugins.x": set()}
    assert layer_violations(graph) == ["slimrarts.plugins.x: unit 'plugins' has no place in LAYERS",
                                       "slimrarts.recipe → slimrarts.search.base",
                                       "slimrarts.search.problem → slimrarts.width.select"]


def test_library_modules_never_import_the_command_line():
    modules = _modules()
    known = set(modules)
    for name, path in modules.items():
        if name.startswith(CLI_MODULES):
            continue
        bad = [m for m in _imports(name, path, known) if m.startswith(CLI_MODULES)]
        assert not bad, f"{name} imports the command layer: {bad}"


def test_importing_library_modules_loads_no_cli():
    """In a fresh interpreter (importing any `slimrarts.<x>` runs the package's `__init__`, so this covers the
    library as a whole; the static test above covers each module)."""
    code = ("import sys, slimrarts.models, slimrarts.nas, slimrarts.width; "
            f"print(','.join(m for m in sys.modules if m.startswith({CLI_MODULES!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"importing the library loaded {out.stdout.strip()}"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(".")[:2])


def test_every_module_imports_on_its_own():
    """Each module imported first, with no other slimrarts module loaded before it (a fresh slate per module in one
    interpreter; torch and the other dependencies stay loaded): an order-dependent import or a cycle through the
    package fails here with the module's name."""
    names = sorted(n for n in _modules() if n != "slimrarts.__main__")
    code = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m == 'slimrarts' or m.startswith('slimrarts.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        bad.append(name + ': ' + traceback.format_exc().strip().splitlines()[-1])\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_torch_pruning_version_is_in_the_declared_range():
    """The declared range has a floor and a ceiling (the code patches torch-pruning internals) and admits the
    installed version."""
    found = re.search(r'"torch-pruning>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert found, "pyproject.toml must declare torch-pruning as >=floor,<ceiling"
    installed = _version(importlib.metadata.version("torch-pruning"))
    assert _version(found[1]) <= installed < _version(found[2]), (found[0], installed)


def test_the_torch_pruning_patch_point_exists_and_takes_effect():
    """`width.trace` bounds torch-pruning's group search by swapping `dependency.graph.Group`; that only works while
    `get_pruning_group` builds its groups through that module-level name (the index-mapping patch is pinned in
    tests/test_zoo.py)."""
    from torch_pruning.dependency import graph as tp_graph

    from slimrarts.width import trace as groups

    assert hasattr(tp_graph, "Group") and hasattr(tp_graph.Group, "add_dep")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    dg = tp_graph.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    conv = model[0]
    pruner = dg.get_pruner_of_module(conv)
    with pytest.raises(groups.Diverged), groups._bounded_groups(1):
        dg.get_pruning_group(conv, pruner.prune_out_channels, list(range(8)))
    assert tp_graph.Group is not None and len(dg.get_pruning_group(conv, pruner.prune_out_channels, [0])) > 1
