"""`chatroom run`: the engine with a live display of per-stage counts."""

from __future__ import annotations

import logging
import time

from .console import stderr
from .engine import Engine, Progress, RunSummary
from .resolve import Request

log = logging.getLogger(__name__)


def _table(progress: Progress):
    """Two short lines that fit a narrow terminal: totals, then per-stage counts."""
    from rich.text import Text

    rate = progress.rate
    eta = progress.eta
    totals = Text.assemble(
        (f"{progress.phase:<11}", "bold"),
        f" accepted {progress.written}/{progress.target}",
        f"  rejected {progress.rejected}",
        f"  failed {progress.failed}",
        f"  rate {rate * 60:.1f}/min" if rate else "  rate -",
        "  ETA " + (time.strftime("%H:%M:%S", time.gmtime(eta)) if eta else "-"),
    )
    stages = Text(
        "            " + "  ".join(f"{k} {v}" for k, v in progress.done.items()),
        style="dim",
    )
    return Text("\n").join([totals, stages])


def run_with_display(config_path, flags, overrides, fresh) -> RunSummary:
    console = stderr()
    request = Request(config_path=config_path, flags=flags, overrides=overrides)
    if console.is_terminal:
        from rich.live import Live

        with Live(console=console, refresh_per_second=4, transient=False) as live:
            engine = Engine(
                request, fresh=fresh, on_progress=lambda p: live.update(_table(p))
            )
            summary = engine.run()
            live.update(_table(engine.progress))
    else:
        last = [0.0]

        def note(progress: Progress) -> None:
            now = time.monotonic()
            if now - last[0] >= 10:
                last[0] = now
                log.info(
                    "%s: %d/%d accepted, %d rejected, %d failed",
                    progress.phase,
                    progress.written,
                    progress.target,
                    progress.rejected,
                    progress.failed,
                )

        engine = Engine(request, fresh=fresh, on_progress=note)
        summary = engine.run()
    _print_summary(summary)
    return summary


def _print_summary(summary: RunSummary) -> None:
    console = stderr()
    line = (
        f"{summary.status}: {summary.written}/{summary.target} records in "
        f"{summary.output} ({summary.rejected} rejected, {summary.failed} failed, "
        f"{summary.attempted} candidates, {summary.seconds:.1f} s)"
    )
    console.print(line, highlight=False, markup=False)
    for reason, number in sorted(
        summary.rejections_by_reason.items(), key=lambda kv: -kv[1]
    )[:5]:
        console.print(f"  rejected {number} x {reason}", highlight=False, markup=False)
    if summary.message:
        console.print(summary.message, highlight=False, markup=False)
