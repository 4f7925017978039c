"""Progress of a table copy (`setup`'s initial copy, a backfill): rows, rows per second, ETA.

The copy calls one hook, `progress(table, rows_copied)`, after each chunk commits.
This module owns what that hook shows:

* `CopyProgress`: the arithmetic (rate since the table's copy started, estimated total,
  time left) and throttling, handing a `CopyReport` to any `emit` callable;
* `terminal_progress()`: a click progress bar with rows/s and an ETA when the output is
  a terminal, and plain lines at most every few seconds otherwise (logs, CI, pipes);
* `progress_reporter()`: the same reports as structured log lines, for `slipstream run`.

The total is an estimate (`pg_class.reltuples`, what the planner believes), so the bar
may end a little short of or past 100%; a table never analysed has no estimate and
shows rows and rate only.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import click

Estimate = Callable[[str], int | None]

__all__ = ["CopyProgress", "CopyReport", "estimate_rows", "progress_reporter", "terminal_progress"]


@dataclass(frozen=True, slots=True)
class CopyReport:
    table: str
    rows: int
    total: int | None  # estimated rows in the table, when known
    rows_per_second: float
    eta_seconds: float | None

    def line(self) -> str:
        of = f" of ~{self.total:,}" if self.total else ""
        eta = f", ETA {_duration(self.eta_seconds)}" if self.eta_seconds is not None else ""
        # No rate yet at a table's first report: its rows may be an earlier run's.
        rate = f", {self.rows_per_second:,.0f} rows/s" if self.rows_per_second > 0 else ""
        return f"copy {self.table}: {self.rows:,}{of} rows{rate}{eta}"


def _duration(seconds: float) -> str:
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def estimate_rows(conn: Any, relation: str) -> int | None:
    """The planner's row estimate for `schema.table`, or None if it has none yet."""
    row = conn.execute(
        "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)", (relation,)
    ).fetchone()
    return None if row is None or row[0] is None or row[0] < 0 else int(row[0])


class CopyProgress:
    """The `progress(table, rows)` hook: works out rate and ETA, emits at most every `every` s."""

    def __init__(self, emit: Callable[[CopyReport], None], *, estimate: Estimate | None = None,
                 every: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.estimate, self.every, self.clock = emit, estimate, every, clock
        self._table: str | None = None
        self._started = self._last = 0.0
        self._base_rows = 0  # rows copied before this run (a resumed copy); not in the rate
        self._total: int | None = None

    def __call__(self, table: str, rows: int) -> None:
        now = self.clock()
        if table != self._table:
            # The first chunk of a table: its rate counts from the previous report's time
            # (or now), and rows copied by an earlier, interrupted run are left out of it.
            self._table, self._total = table, self._estimate(table)
            self._started, self._base_rows = now, rows
        elif now - self._last < self.every:
            return
        self._last = now
        self.emit(self.report(table, rows, now))

    def report(self, table: str, rows: int, now: float | None = None) -> CopyReport:
        now = self.clock() if now is None else now
        elapsed = now - self._started
        done_here = rows - self._base_rows
        rate = done_here / elapsed if elapsed > 0 and done_here > 0 else 0.0
        total = self._total
        if total is not None and rows > total:
            total = rows  # the estimate was low; never show more than 100%
        eta = (total - rows) / rate if total is not None and rate > 0 else None
        return CopyReport(table, rows, total, rate, eta)

    def close(self) -> None:
        """End the output (a terminal bar's line); nothing to do for plain lines."""

    def _estimate(self, table: str) -> int | None:
        if self.estimate is None:
            return None
        try:
            return self.estimate(table)
        except Exception:  # noqa: BLE001 - an estimate is a nicety; the copy goes on without it
            return None


class _Bar:
    """One click progress bar per table, replaced when the copy moves to the next table."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.bar: Any = None
        self.table: str | None = None
        self.shown = 0
        self.text = ""

    def __call__(self, report: CopyReport) -> None:
        if report.table != self.table:
            self.close()
            self.table, self.shown = report.table, 0
            self.bar = click.progressbar(
                length=report.total, label=f"copy {report.table}", file=self.stream,
                show_eta=True, show_percent=report.total is not None, show_pos=True,
                item_show_func=lambda _: self.text)
            self.bar.__enter__()
        self.text = f"{report.rows_per_second:,.0f} rows/s" if report.rows_per_second > 0 else ""
        if report.total is not None and self.bar.length != report.total:
            self.bar.length = report.total
        self.bar.update(report.rows - self.shown)
        self.shown = report.rows

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class _TerminalProgress(CopyProgress):
    def __init__(self, stream: IO[str], estimate: Estimate | None) -> None:
        self._bar = _Bar(stream)
        super().__init__(self._bar, estimate=estimate, every=0.0)

    def close(self) -> None:
        self._bar.close()


def terminal_progress(estimate: Estimate | None = None, *, stream: IO[str] | None = None,
                      every: float = 5.0) -> CopyProgress:
    """A progress bar on a terminal, else a plain line at most every `every` seconds.

    Call `.close()` on the result after the copy, to end the bar's line.
    """
    stream = stream or sys.stdout
    if stream.isatty():
        return _TerminalProgress(stream, estimate)
    return CopyProgress(lambda r: click.echo(r.line(), file=stream), estimate=estimate, every=every)


def progress_reporter(log: Any, event: str = "copy_progress", *, estimate: Estimate | None = None,
                      every: float = 5.0) -> CopyProgress:
    """Reports as structured log lines (`event`, table, rows, total_estimate, rows_per_s, eta_s)."""

    def emit(r: CopyReport) -> None:
        log.info(event, table=r.table, rows=r.rows, total_estimate=r.total,
                 rows_per_s=round(r.rows_per_second, 1),
                 eta_s=None if r.eta_seconds is None else round(r.eta_seconds, 1))

    return CopyProgress(emit, estimate=estimate, every=every)
