"""How long `chatroom export` takes for runs of 100 and 1,000 records.

    python benchmarks/bench_export.py                     # 100 and 1,000 records
    python benchmarks/bench_export.py --counts 100 --size 512x768 --masks

The runs are made in-process with the fake generator and extractor of
chatroom.testing (seeded noise images, which PNG cannot compress: a worst case for
size), then exported to Parquet and to WebDataset. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
REFS = (
    Path(os.environ.get("CHATROOM_SHARED", ROOT.parent / "shared")) / "data/reference"
)


def make_run(out: Path, count: int, width: int, height: int, masks: bool) -> float:
    """A finished run of ``count`` records made with the fakes; seconds it took."""
    from chatroom.components import Annotator
    from chatroom.engine import Engine
    from chatroom.hookspecs import hookimpl
    from chatroom.models import Annotation
    from chatroom.resolve import Request
    from chatroom.testing import FAKE_CONFIG, fake_plugins

    class HalfMasks(Annotator):
        name = "half_masks"

        def annotate(self, candidates, verdicts):
            from PIL import Image

            notes = []
            for candidate in candidates:
                w, h = candidate.image.size
                top = Image.new("L", (w, h), 0)
                top.paste(255, (0, 0, w, h // 2))
                bottom = Image.new("L", (w, h), 255)
                bottom.paste(0, (0, 0, w, h // 2))
                notes.append(
                    Annotation(annotator="masks", masks={"top": top, "bottom": bottom})
                )
            return notes

    class Offers:
        @hookimpl
        def register_annotators(self, register):
            register(HalfMasks)

    plugins = fake_plugins()
    overrides = [f"generator.width={width}", f"generator.height={height}"]
    if masks:
        plugins.register(Offers(), name="half-masks")
        overrides.append('annotators.masks.use="half_masks"')
    config = out.parent / "fake.toml"
    config.write_text(FAKE_CONFIG)
    request = Request(
        config_path=str(config),
        flags={
            "references": str(REFS / "fashion"),
            "count": count,
            "output": str(out),
        },
        overrides=overrides,
    )
    start = time.perf_counter()
    summary = Engine(request, plugins=plugins).run()
    if summary.written != count:
        sys.exit(f"the run wrote {summary.written} of {count} records")
    return time.perf_counter() - start


def bench(count: int, width: int, height: int, masks: bool, repeat: int) -> dict:
    from chatroom.export import export_run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        made = make_run(out, count, width, height, masks)
        result: dict = {
            "records": count,
            "image": f"{width}x{height}",
            "masks per record": 2 if masks else 0,
            "make the run (s)": round(made, 2),
        }
        for fmt in ("parquet", "webdataset"):
            times = []
            for _ in range(repeat):
                start = time.perf_counter()
                exported = export_run(out, fmt, Path(tmp) / fmt, shard_size=1000)
                times.append(time.perf_counter() - start)
            size = sum(s["bytes"] for s in exported.shards)
            result[fmt] = {
                f"export (median of {repeat}, s)": round(statistics.median(times), 3),
                "records per second": round(count / statistics.median(times)),
                "shards": len(exported.shards),
                "MB": round(size / 1e6, 1),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--size", default="64x96", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--masks", action="store_true", help="two masks per record")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))

    results = [
        bench(count, width, height, args.masks, args.repeat) for count in args.counts
    ]
    json.dump(results, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
