"""Behaviour unchanged by refactors: 50 steps of the demo's search give the α, w and y of the golden file."""

from __future__ import annotations

import pytest
import torch
from golden_search import GOLDEN, cpu_kind, search_state

# The comparison is bitwise, so it needs the kernels that wrote the file: on another kind of CPU, or another torch,
# 50 α-steps amplify rounding into different α (golden_search.py's docstring), and no tolerance separates that
# from a change of behaviour. A new kind of CPU gets its file with `python tests/golden_search.py --write`.
_golden = torch.load(GOLDEN, weights_only=True) if GOLDEN.is_file() else None


@pytest.mark.skipif(_golden is None, reason=f"no golden file for this kind of CPU ({cpu_kind()}): the search's bits "
                    "depend on it; write one with `python tests/golden_search.py --write` from a commit whose "
                    "behaviour is known good")
@pytest.mark.skipif(_golden is not None and _golden["torch"] != str(torch.__version__),
                    reason=f"the golden file was written with torch {_golden and _golden['torch']}, this is "
                    f"{torch.__version__}: its kernels round differently")
def test_demo_search_matches_golden_file():
    assert _golden["cpu_capability"] == torch.backends.cpu.get_cpu_capability(), "file named for another CPU"
    state = search_state()
    assert sorted(state) == sorted(_golden["state"]), "the search's variables changed names or number"
    for name, ref in _golden["state"].items():
        got = state[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        assert torch.equal(got, ref), f"{name}: max |Δ| {(got.double() - ref.double()).abs().max():.3g}"
    moved = [k for k in _golden["state"] if k.startswith("alpha.")]
    assert any(not torch.equal(_golden["state"][k], torch.ones_like(_golden["state"][k])) for k in moved), \
        "the golden search left α at its start: it would not detect a change of the α-step"
