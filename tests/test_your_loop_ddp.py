"""`WidthSearch` under the user's own DDP (torchrun around their loop, 2 gloo processes; issue 25): for a one-net
search the user's DistributedDataParallel averages the weights and the object α; RARTS is not wrapped and the
object averages the gradients of w, y and α. Every rank ends with the same α and cuts the same slim model."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import flat_tensors, torchrun_script


def test_every_rank_of_the_users_ddp_loop_ends_with_the_same_search_and_cut(tmp_path):
    done = torchrun_script(Path(__file__).with_name("your_loop_worker.py"), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for method in ("joint", "rarts"):
        a, b = ranks[0][method], ranks[1][method]
        assert a["kept"] == b["kept"], method
        fa = flat_tensors({k: v for k, v in a.items() if k != "kept"})
        fb = flat_tensors({k: v for k, v in b.items() if k != "kept"})
        assert fa.keys() == fb.keys()
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (method, k)
        assert any(not torch.equal(t, torch.ones_like(t)) for t in a["alphas"]), method  # α did learn
        assert sum(len(k) for k in a["kept"]) < sum(int(v.numel()) for v in a["alphas"]), method  # and was cut
