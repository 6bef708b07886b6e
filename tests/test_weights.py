"""The trained ResNet-20 shipped in weights/ (the demo and the CPU tier start from it): its file is the one recorded,
it loads strictly into the zoo's resnet20, and (slow, with the real data) it has the accuracy recorded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from slimrarts.models import create_model

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def _record() -> dict:
    return json.loads((WEIGHTS / "resnet20_cifar10.json").read_text())


def test_shipped_weights_match_their_recorded_sha256():
    record = _record()
    digest = hashlib.sha256((WEIGHTS / "resnet20_cifar10.pt").read_bytes()).hexdigest()
    assert digest == record["sha256"]
    assert (WEIGHTS.parent / record["recipe"]).is_file()


def test_shipped_weights_load_strictly_into_resnet20():
    payload = torch.load(WEIGHTS / "resnet20_cifar10.pt", map_location="cpu", weights_only=True)
    info = json.loads(payload["model"])
    assert info["name"] == "resnet20" and info["num_classes"] == 10
    model = create_model("resnet20", num_classes=10)
    model.load_state_dict(payload["state_dict"], strict=True)
    assert all(torch.isfinite(v).all() for v in payload["state_dict"].values() if v.is_floating_point())


_REAL = os.environ.get("SLIMRARTS_TEST_ARCHIVE")


@pytest.mark.slow
@pytest.mark.skipif(not _REAL, reason="needs the real CIFAR-10: set SLIMRARTS_TEST_ARCHIVE to its archive")
def test_shipped_weights_have_the_recorded_test_accuracy():
    """The accuracy recorded beside the weights is what they score on the 10,000 test images."""
    from slimrarts.data import DeviceLoader, load_cifar
    from slimrarts.engine import evaluate

    _, test = load_cifar("cifar10", _REAL)
    payload = torch.load(WEIGHTS / "resnet20_cifar10.pt", map_location="cpu", weights_only=True)
    model = create_model("resnet20", num_classes=10)
    model.load_state_dict(payload["state_dict"])
    acc = evaluate(model, DeviceLoader(test, 1000, train=False))["acc"]
    assert acc == pytest.approx(_record()["test_acc"], abs=1e-4)
