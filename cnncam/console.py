"""Progress and logging that suit both a terminal and a Slurm ``.out`` file.

On a TTY we show a rich progress bar.  Off a TTY (batch jobs) rich would only print
its final frame, so we log a plain line every ``interval_s`` seconds instead: a
10-hour job's log then shows where it is and how fast it goes.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("cnncam")


def is_tty() -> bool:
    return sys.stdout.isatty()


def setup_logging(rank: int = 0, level: int = logging.INFO) -> None:
    """Log to stdout; ranks other than 0 only log warnings (no 8x duplicated lines)."""
    root = logging.getLogger("cnncam")
    root.handlers.clear()
    handler: logging.Handler
    if is_tty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    root.propagate = False


def track(
    items: Iterable[T],
    total: int | None = None,
    desc: str = "",
    interval_s: float = 30.0,
    enabled: bool = True,
    unit: str = "it",
) -> Iterator[T]:
    """Iterate ``items`` with a rich bar on a TTY, periodic log lines otherwise."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if not enabled:
        yield from items
        return
    if is_tty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            task = progress.add_task(desc, total=total, rate="")
            start = time.perf_counter()
            for i, item in enumerate(items, 1):
                yield item
                rate = i / max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=1, rate=f"{rate:.1f} {unit}/s")
        return
    start = last = time.perf_counter()
    i = 0
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= interval_s:
            last = now
            of = f"/{total}" if total else ""
            log.info("%s %d%s (%.1f %s/s)", desc, i, of, i / (now - start), unit)
    log.info("%s done: %d %s in %.1f s", desc, i, unit, time.perf_counter() - start)
