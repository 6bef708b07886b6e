"""Progress shown by every phase: a rich bar in a terminal, plain lines anywhere else (a log, CI, `nohup`, a
notebook), where a live bar would print truncated fragments."""

from __future__ import annotations

import datetime
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["PlainProgress", "console", "make_progress"]

console = Console()


class PlainProgress:
    """The part of `rich.progress.Progress` the phases use, printed as whole lines: one at every epoch's summary
    (`update(..., refresh=True)`) and, within an epoch, at most one per `every_s` seconds."""

    def __init__(self, out: Console, every_s: float = 30.0, enabled: bool = True):
        self.out, self.every_s, self.enabled = out, every_s, enabled
        self.tasks: list[dict] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = time.perf_counter()
        self.tasks.append({"description": description, "total": total, "completed": completed,
                           "info": fields.get("info", ""), "start": now, "last": now})
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.tasks[task]["completed"] += advance

    def update(self, task: int, *, refresh: bool = False, info: str | None = None, **_) -> None:
        t = self.tasks[task]
        if info is not None:
            t["info"] = info
        now = time.perf_counter()
        if self.enabled and (refresh or now - t["last"] >= self.every_s):
            t["last"] = now
            self.out.print(self.line(task), markup=False, highlight=False, soft_wrap=True)

    def line(self, task: int) -> str:
        t = self.tasks[task]
        done, total = int(t["completed"]), t["total"]
        count = f"{done}/{int(total)} ({100 * done / total:.0f}%)" if total else f"{done}"
        elapsed = datetime.timedelta(seconds=round(time.perf_counter() - t["start"]))
        return f"{t['description']} {count} {elapsed} {t['info']}".rstrip()


def make_progress(enabled: bool = True, out: Console | None = None) -> Progress | PlainProgress:
    """A progress display with a free-text `info` field (loss, accuracy, images/s): a live bar when `out` (the
    library's console) is a terminal, else plain lines."""
    out = console if out is None else out
    if not out.is_terminal:
        return PlainProgress(out, enabled=enabled)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=out,
        disable=not enabled,
        transient=False,
    )
