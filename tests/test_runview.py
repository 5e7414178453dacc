"""The live display shows per-stage counts, accepted and rejected, rate and ETA."""

import time

from rich.console import Console

from chatroom.engine import Progress
from chatroom.runview import _table


def test_progress_table_shows_counts_rate_and_eta():
    progress = Progress(target=10, budget=40, written=4, rejected=3, failed=1)
    progress.started = time.monotonic() - 60  # four records in a minute
    progress.phase = "generating"
    progress.done.update(prompt=9, generate=8, filter=8, annotate=5, write=8)

    console = Console(width=200, record=True)
    console.print(_table(progress))
    text = console.export_text()

    for column in (
        "prompt",
        "generate",
        "filter",
        "annotate",
        "accepted",
        "rejected",
        "failed",
        "rate",
        "ETA",
    ):
        assert column in text
    assert "generating" in text and "accepted 4/10" in text
    assert "generate 8" in text and "annotate 5" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "4.0/min" in text
    assert "00:01:30" in text  # six more records at four a minute
