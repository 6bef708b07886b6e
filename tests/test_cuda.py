"""CUDA-only checks: a captured train step computes exactly what the eager step computes."""

from __future__ import annotations

import pytest
import torch

from slimrarts.data import DeviceLoader
from slimrarts.engine import fit
from slimrarts.models import create_model
from slimrarts.recipe import OptimConfig, TrainConfig

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")]


def test_graphed_train_step_matches_eager(tiny_sets):
    train, _ = tiny_sets
    device = torch.device("cuda")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    results = []
    for graph in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny_resnet").to(device)
        cfg = TrainConfig(epochs=2, optim=OptimConfig(lr=0.05), cuda_graph=graph)
        res = fit(model, DeviceLoader(train, 20, train=True, device=device), None, cfg=cfg, device=device,
                  progress=False)
        results.append((model.state_dict(), res.history[-1]))
    assert results[1][1]["cuda_graph"] is True
    for (k, a), b in zip(results[0][0].items(), results[1][0].values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
