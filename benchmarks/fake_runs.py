"""Finished runs made in-process with chatroom.testing's fakes, for the benchmarks.

Run from a benchmark script in this folder: ``from fake_runs import make_run``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
REFS = (
    Path(os.environ.get("CHATROOM_SHARED", ROOT.parent / "shared")) / "data/reference"
)


def make_run(
    out: Path,
    count: int,
    overrides: list[str] = (),
    masks: bool = False,
    keypoints: bool = False,
) -> float:
    """A finished run of ``count`` records; seconds it took.

    ``masks`` adds a top and a bottom part mask to every record, ``keypoints`` a
    standing COCO-18 figure (so the report's gallery draws overlays).
    """
    from chatroom.components import Annotator
    from chatroom.engine import Engine
    from chatroom.hookspecs import hookimpl
    from chatroom.models import Annotation
    from chatroom.resolve import Request
    from chatroom.testing import FAKE_CONFIG, fake_plugins

    class Parts(Annotator):
        name = "bench_parts"

        def annotate(self, candidates, verdicts):
            from PIL import Image

            notes = []
            for candidate in candidates:
                w, h = candidate.image.size
                note = Annotation(annotator="bench_parts")
                if masks:
                    top = Image.new("L", (w, h), 0)
                    top.paste(255, (0, 0, w, h // 2))
                    bottom = Image.new("L", (w, h), 0)
                    bottom.paste(255, (0, h // 2, w, h))
                    note.masks = {"top": top, "bottom": bottom}
                if keypoints:
                    note.keypoints = [
                        [w / 2 + (i % 3 - 1) * w / 6, h * (i + 1) / 20, 0.9]
                        for i in range(18)
                    ]
                notes.append(note)
            return notes

    class Offers:
        @hookimpl
        def register_annotators(self, register):
            register(Parts)

    plugins = fake_plugins()
    overrides = list(overrides)
    if masks or keypoints:
        plugins.register(Offers(), name="bench-parts")
        overrides.append('annotators.parts.use="bench_parts"')
    config = out.parent / "fake.toml"
    config.write_text(FAKE_CONFIG)
    request = Request(
        config_path=str(config),
        flags={"references": str(REFS / "fashion"), "count": count, "output": str(out)},
        overrides=overrides,
    )
    start = time.perf_counter()
    summary = Engine(request, plugins=plugins).run()
    if summary.written != count:
        sys.exit(f"the run wrote {summary.written} of {count} records")
    return time.perf_counter() - start
