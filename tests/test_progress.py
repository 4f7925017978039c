"""Copy progress: rows per second and an ETA, as a bar on a terminal and lines otherwise."""

from __future__ import annotations

import io
from pathlib import Path

from slipstream.worker.progress import (
    CopyProgress,
    CopyReport,
    progress_reporter,
    terminal_progress,
)

from .cli_harness import cli, run_sql, shown, write_config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_and_eta_from_the_rows_copied_in_this_run() -> None:
    clock, seen = Clock(), []
    p = CopyProgress(seen.append, estimate=lambda t: 10_000, every=5.0, clock=clock)
    p("public.notes", 1_000)  # resumed: 1,000 rows were copied before this run
    clock.now += 2
    p("public.notes", 3_000)  # throttled: within 5 s of the last report
    clock.now += 3
    p("public.notes", 5_000)
    assert [r.rows for r in seen] == [1_000, 5_000]
    assert seen[0].line() == "copy public.notes: 1,000 of ~10,000 rows"  # no rate measured yet
    last = seen[-1]
    assert last.rows_per_second == 4_000 / 5  # 4,000 rows in 5 s, the earlier 1,000 left out
    assert last.eta_seconds == (10_000 - 5_000) / 800
    assert last.line() == "copy public.notes: 5,000 of ~10,000 rows, 800 rows/s, ETA 6s"


def test_a_new_table_reports_at_once_and_a_low_estimate_caps_at_the_rows_seen() -> None:
    clock, seen = Clock(), []
    p = CopyProgress(seen.append, estimate={"a": 10, "b": None}.get, every=60, clock=clock)
    p("a", 10)
    clock.now += 1
    p("a", 25)  # throttled
    p("b", 7)  # another table: reported at once
    assert [(r.table, r.rows) for r in seen] == [("a", 10), ("b", 7)]
    clock.now += 1
    seen.clear()
    q = CopyProgress(seen.append, estimate=lambda t: 10, every=0, clock=clock)
    q("a", 0)
    clock.now += 1
    q("a", 30)
    assert seen[-1].total == 30 and seen[-1].eta_seconds == 0
    assert "ETA" not in CopyReport("b", 7, None, 0.0, None).line()


def test_an_estimate_that_fails_only_drops_the_eta() -> None:
    def broken(table: str) -> int:
        raise RuntimeError("no catalog")

    seen: list[CopyReport] = []
    CopyProgress(seen.append, estimate=broken)("t", 5)
    assert seen[0].total is None and seen[0].eta_seconds is None


def test_plain_lines_when_the_output_is_not_a_terminal() -> None:
    out = io.StringIO()
    p = terminal_progress(lambda t: 100, stream=out)
    p("public.notes", 50)
    p.close()
    assert out.getvalue() == "copy public.notes: 50 of ~100 rows\n"  # a first report has no rate yet


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_with_rate_and_eta_on_a_terminal() -> None:
    out = FakeTerminal()
    clock = Clock()
    p = terminal_progress(lambda t: 1_000, stream=out)
    p.clock = clock
    p("public.notes", 100)
    clock.now += 1
    p("public.notes", 600)
    p("public.other", 10)
    p.close()
    text = out.getvalue()
    assert "copy public.notes" in text and "copy public.other" in text
    assert "rows/s" in text and "600/1000" in text
    assert "\r" in text  # redrawn in place, not one line per chunk


def test_log_lines_for_run() -> None:
    class Log:
        def __init__(self) -> None:
            self.lines: list[tuple[str, dict]] = []

        def info(self, event: str, **kw: object) -> None:
            self.lines.append((event, kw))

    log = Log()
    progress_reporter(log, "backfill_progress", estimate=lambda t: 40)("public.notes", 20)
    ((event, kw),) = log.lines
    assert event == "backfill_progress"
    assert kw["table"] == "public.notes" and kw["rows"] == 20 and kw["total_estimate"] == 40


def test_setup_prints_progress_lines_when_piped(pg_dsn: str, tmp_path: Path) -> None:
    run_sql(pg_dsn, "CREATE TABLE public.notes (id serial PRIMARY KEY, title text, body text)",
            "INSERT INTO notes (title, body) SELECT 'n' || g, 'b' FROM generate_series(1, 120) g",
            "ANALYZE notes")
    config = write_config(tmp_path / "slipstream.toml", pg_dsn,
                          '[tables."public.notes"]\ntitle = "{title}"\nbody = "{body}"\n',
                          worker={"snapshot_chunk_rows": 50})
    done = cli("setup", "--config", str(config), cwd=tmp_path)
    assert done.returncode == 0, shown(done)
    assert "copy public.notes: 50 of ~120 rows\n" in done.stdout, shown(done)
    assert "0 rows/s" not in done.stdout  # no rate is shown before one is measured
    assert "snapshot: public.notes: 120 rows" in done.stdout
