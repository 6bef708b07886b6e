"""`WidthSearch` under the user's own DDP (torchrun around their loop, 2 gloo processes; issue 25): for a one-net
search the user's DistributedDataParallel averages the weights and the object α; RARTS is not wrapped and the
object averages the gradients of w, y and α. Every rank ends with the same α and cuts the same slim model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _flat(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}[{i}]").items()}
    return {}


def test_every_rank_of_the_users_ddp_loop_ends_with_the_same_search_and_cut(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).with_name("your_loop_worker.py")), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for method in ("joint", "rarts"):
        a, b = ranks[0][method], ranks[1][method]
        assert a["kept"] == b["kept"], method
        fa, fb = _flat({k: v for k, v in a.items() if k != "kept"}), _flat({k: v for k, v in b.items() if k != "kept"})
        assert fa.keys() == fb.keys()
        for k in fa:
            assert torch.equal(fa[k], fb[k]), (method, k)
        assert any(not torch.equal(t, torch.ones_like(t)) for t in a["alphas"]), method  # α did learn
        assert sum(len(k) for k in a["kept"]) < sum(int(v.numel()) for v in a["alphas"]), method  # and was cut
