"""How long `chatroom report` takes for runs of 100 and 1,000 records.

    python benchmarks/bench_report.py                  # 100 and 1,000 records
    python benchmarks/bench_report.py --counts 100 --no-extras

The runs are made in-process with the fake generator and extractor of
chatroom.testing, plus an annotator that adds two part masks and COCO-18 keypoints
to every record (so the gallery draws overlays). Each run is reported twice: first
into an empty report folder, then again with the thumbnails already there. The
parts' seconds come from summary.json. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
REFS = (
    Path(os.environ.get("CHATROOM_SHARED", ROOT.parent / "shared")) / "data/reference"
)


def make_run(out: Path, count: int) -> float:
    """A finished run of ``count`` annotated records made with the fakes; seconds."""
    from chatroom.components import Annotator
    from chatroom.engine import Engine
    from chatroom.hookspecs import hookimpl
    from chatroom.models import Annotation
    from chatroom.resolve import Request
    from chatroom.testing import FAKE_CONFIG, fake_plugins

    class MasksAndPose(Annotator):
        name = "masks_and_pose"

        def annotate(self, candidates, verdicts):
            from PIL import Image

            notes = []
            for candidate in candidates:
                w, h = candidate.image.size
                top = Image.new("L", (w, h), 0)
                top.paste(255, (0, 0, w, h // 2))
                bottom = Image.new("L", (w, h), 0)
                bottom.paste(255, (0, h // 2, w, h))
                # a standing figure: 18 joints down the middle of the image
                keypoints = [
                    [w / 2 + (i % 3 - 1) * w / 6, h * (i + 1) / 20, 0.9]
                    for i in range(18)
                ]
                notes.append(
                    Annotation(
                        annotator="masks_and_pose",
                        masks={"top": top, "bottom": bottom},
                        keypoints=keypoints,
                    )
                )
            return notes

    class Offers:
        @hookimpl
        def register_annotators(self, register):
            register(MasksAndPose)

    plugins = fake_plugins()
    plugins.register(Offers(), name="masks-and-pose")
    config = out.parent / "fake.toml"
    config.write_text(FAKE_CONFIG)
    request = Request(
        config_path=str(config),
        flags={"references": str(REFS / "fashion"), "count": count, "output": str(out)},
        overrides=[
            "generator.blank_every=7",
            'annotators.masks.use="masks_and_pose"',
        ],
    )
    start = time.perf_counter()
    summary = Engine(request, plugins=plugins).run()
    if summary.written != count:
        sys.exit(f"the run wrote {summary.written} of {count} records")
    return time.perf_counter() - start


def bench(count: int, extras: bool) -> dict:
    from chatroom.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        made = make_run(out, count)
        result: dict = {"records": count, "make the run (s)": round(made, 2)}
        for label in ("first build (s)", "rebuild, thumbnails kept (s)"):
            start = time.perf_counter()
            index = build_report(out, embeddings=extras, quality=extras)
            result[label] = round(time.perf_counter() - start, 2)
            if label.startswith("first"):
                summary = json.loads((index.parent / "summary.json").read_text())
                result["parts (s)"] = summary["timings"]
                result["map"] = summary["map"].get("method", "off")
                result["pages"] = len(list(index.parent.glob("*.html")))
                files = [p for p in index.parent.rglob("*") if p.is_file()]
                result["report MB"] = round(
                    sum(p.stat().st_size for p in files) / 1e6, 1
                )
        shutil.rmtree(out / "report")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--no-extras",
        dest="extras",
        action="store_false",
        help="leave out the embedding map and the BRISQUE scores",
    )
    args = parser.parse_args()
    results = [bench(count, args.extras) for count in args.counts]
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
