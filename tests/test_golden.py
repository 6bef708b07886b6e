"""Behaviour unchanged by refactors: 50 steps of the demo's search give the α, w and y of the golden file."""

from __future__ import annotations

import pytest
import torch
from golden_search import GOLDEN, cpu_vendor, search_state


@pytest.mark.skipif(not GOLDEN.is_file(), reason=f"no golden file for this CPU vendor ({cpu_vendor()}): the search's "
                    "bits depend on it; write one with `python tests/golden_search.py --write` from a commit whose "
                    "behaviour is known good")
def test_demo_search_matches_golden_file():
    golden = torch.load(GOLDEN, weights_only=True)
    state = search_state()
    assert sorted(state) == sorted(golden["state"]), "the search's variables changed names or number"
    same_machine = (golden["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
                    and golden["torch"] == str(torch.__version__))
    for name, ref in golden["state"].items():
        got = state[name]
        assert got.dtype == ref.dtype and got.shape == ref.shape, name
        if same_machine:  # the golden file's kernels: every bit
            assert torch.equal(got, ref), f"{name}: max |Δ| {(got.double() - ref.double()).abs().max():.3g}"
        else:  # another CPU instruction set (or torch) picks other kernels: rounding only, not behaviour
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=name)
    moved = [k for k in golden["state"] if k.startswith("alpha.")]
    assert any(not torch.equal(golden["state"][k], torch.ones_like(golden["state"][k])) for k in moved), \
        "the golden search left α at its start: it would not detect a change of the α-step"
