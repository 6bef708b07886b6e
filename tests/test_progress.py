"""Progress where a person reads it: a live bar in a terminal, whole plain lines in a log (CI, nohup, notebooks)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from slimrarts.engine.progress import PlainProgress, make_progress

INFO = "ep 1 t_loss 0.153 t_acc 0.946 v_acc 0.950 340 img/s"


def _log(width=40):
    return Console(file=io.StringIO(), force_terminal=False, width=width)


def test_a_log_gets_whole_lines_not_a_truncated_bar():
    out = _log()
    with make_progress(True, out) as bar:
        assert isinstance(bar, PlainProgress)
        task = bar.add_task("search (rarts)", total=10, completed=0, info="")
        for _ in range(10):
            bar.advance(task)
            bar.update(task, info="running")  # within an epoch: rate-limited, nothing yet
        bar.update(task, info=INFO, refresh=True)  # the epoch's summary
    text = out.file.getvalue()
    assert text.count("\n") == 1 and "…" not in text and "━" not in text
    assert text.startswith("search (rarts) 10/10 (100%) 0:00:00 ") and text.rstrip().endswith(INFO)


def test_plain_lines_within_an_epoch_are_rate_limited_and_off_when_disabled():
    out = _log()
    bar = PlainProgress(out, every_s=0.0)
    task = bar.add_task("finetune", total=4, completed=2, info="")
    bar.advance(task)
    bar.update(task, info="loss 0.5")
    assert out.file.getvalue().splitlines() == ["finetune 3/4 (75%) 0:00:00 loss 0.5"]
    quiet = _log()
    off = make_progress(False, quiet)
    t = off.add_task("x", total=2, completed=0, info="")
    off.update(t, info="y", refresh=True)
    assert quiet.file.getvalue() == ""


def test_a_terminal_keeps_the_live_bar():
    bar = make_progress(True, Console(file=io.StringIO(), force_terminal=True))
    assert isinstance(bar, Progress)
