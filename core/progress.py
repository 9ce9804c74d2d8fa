"""Progress for long work (training, calibration, benchmarking), always on stderr so that
`--json` output on stdout stays clean. A live bar on a terminal, a line per ~10% in logs."""
from __future__ import annotations

import contextlib
import sys
import time

QUIET = False  # set by the CLI's --quiet


class _Bar:
    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, max(1, total), 0
        self.started = time.perf_counter()
        self._next_report = 0.1
        self._live = None
        if not QUIET and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
            self._live = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                  TimeRemainingColumn(), transient=True)
            self._live.start()
            self._task = self._live.add_task(label, total=self.total)

    def advance(self, status: str = "", n: int = 1) -> None:
        self.done += n
        if self._live is not None:
            self._live.update(self._task, advance=n, description=f"{self.label} {status}".strip())
        elif not QUIET and self.done / self.total >= self._next_report:
            self._next_report += 0.1
            print(f"[edgec] {self.label}: {100 * self.done // self.total}% {status} "
                  f"({time.perf_counter() - self.started:.0f}s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()


@contextlib.contextmanager
def progress_bar(label: str, total: int):
    bar = _Bar(label, total)
    try:
        yield bar
    finally:
        bar.close()


def note(message: str) -> None:
    """A one-line status message for people (stderr)."""
    if not QUIET:
        print(f"[edgec] {message}", file=sys.stderr, flush=True)
