"""Progress of a scoring run: rows done / total, images/s and ETA; a bar on a terminal, a line
every `interval` seconds otherwise (`ray job submit` logs, cron mail).

The driver's table writer reports each batch of rows as it arrives (`add`); a thread draws,
so the line keeps coming while no batch does. Ray Data's own progress is turned off for the
run: it cannot know the total and would draw over this line."""
from __future__ import annotations

import sys
import threading
import time

BAR_WIDTH = 30


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "--:--:--"
    seconds = int(round(seconds))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_text(done: int, total: int, elapsed: float, bar: bool) -> str:
    """`[#####.....] 50/100 rows  12.5 images/s  ETA 00:00:04` (bar) or
    `scored 50/100 rows (50%), 12.5 images/s, ETA 00:00:04`."""
    done = min(done, total)  # a retried task counts its rows again
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else None
    if bar:
        filled = BAR_WIDTH * done // max(total, 1)
        return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{total} rows  {rate:.1f} images/s  "
                f"ETA {_clock(eta)}")
    return f"scored {done}/{total} rows ({100 * done // max(total, 1)}%), {rate:.1f} images/s, ETA {_clock(eta)}"


class ScoringProgress:
    """Context manager around a pipeline run, told of rows by `add`. `bar` defaults to whether
    `stream` is a terminal: make it before stderr is redirected."""

    def __init__(self, total: int, stream=None, bar: bool | None = None, interval: float | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.interval = interval or (0.5 if self.bar else 30.0)
        self.rows, self._drawn = 0, -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scoring-progress", daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> "ScoringProgress":
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.bar or self.rows != self._drawn:
            self._draw(self.rows, final=True)

    def add(self, n: int) -> None:
        self.rows += n

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.bar or self.rows != self._drawn:  # lines only when the count moved
                self._draw(self.rows)

    def _draw(self, rows: int, final: bool = False) -> None:
        self._drawn = rows
        text = progress_text(rows, self.total, time.perf_counter() - self._start, self.bar)
        # write(), not print(): one call per line, as the training log does
        self.stream.write(f"\r{text}\x1b[K" + ("\n" if final else "") if self.bar else text + "\n")
        self.stream.flush()
