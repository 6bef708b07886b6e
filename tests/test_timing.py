"""The one timing harness (`slimrarts.timing`): warm-up first, rounds interleaved, medians of round medians."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from slimrarts.metrics import measure_latency
from slimrarts.timing import time_calls, time_models


def test_calls_are_warmed_up_then_interleaved_round_by_round():
    order: list[tuple[str, int]] = []
    seconds = {"a": iter([9.0, 1.0, 2.0, 3.0, 5.0, 4.0, 6.0]), "b": iter([9.0, 7.0, 8.0, 9.0, 9.0, 1.0, 1.0])}

    def timer(fn, n):
        name = fn()
        order.append((name, n))
        return [next(seconds[name]) for _ in range(n)]

    a, b = time_calls([lambda: "a", lambda: "b"], timer, rounds=3, repeats=2, warmup=1)
    assert order == [("a", 1), ("b", 1)] + [("a", 2), ("b", 2)] * 3
    assert a.rounds_s == [1.5, 4.0, 5.0] and a.median_s == 4.0  # the warm-up (9 s) is not counted
    assert b.rounds_s == [7.5, 9.0, 1.0] and b.median_s == 7.5


def test_timing_figures():
    values = iter([0.0, 3.0, 1.0, 2.0, 10.0, 30.0, 20.0, 40.0])

    def timer(fn, n):
        fn()
        return [next(values) for _ in range(n)]

    [t] = time_calls([lambda: None], timer, rounds=2, repeats=4, warmup=0)
    assert t.rounds_s == [1.5, 25.0] and t.median_s == pytest.approx(13.25)
    assert t.spread == pytest.approx((25.0 - 1.5) / 13.25) and t.samples_s == [0.0, 3.0, 1.0, 2.0, 10, 30, 20, 40]
    with pytest.raises(ValueError, match="rounds and repeats"):
        time_calls([lambda: None], timer, rounds=0)


def test_models_are_timed_in_eval_and_inference_mode_and_their_flags_come_back():
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((self.training, torch.is_inference_mode_enabled(), tuple(x.shape), x.dtype))
            return x

    model = nn.Sequential(Probe(), nn.Dropout())
    model[1].eval()
    time_models([model], (3, 4, 4), batch_size=2, rounds=2, repeats=1, warmup=1)
    assert seen == [(False, True, (2, 3, 4, 4), torch.get_default_dtype())] * 3  # 1 warm-up + 2 rounds
    assert model.training and model[0].training and not model[1].training


def test_measure_latency_reads_every_call_of_the_harness():
    seen = []
    model = nn.Conv2d(3, 4, 3)
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    result = measure_latency(model, (3, 8, 8), batch_sizes=(1, 3), warmup=2, repeats=5)
    assert seen == [1] * 7 + [3] * 7
    for stats in result.values():
        assert stats["p10_s"] <= stats["median_s"] <= stats["p90_s"]
