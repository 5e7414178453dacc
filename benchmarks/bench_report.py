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
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_run  # noqa: E402


def bench(count: int, extras: bool) -> dict:
    from chatroom.report import build_report

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        made = make_run(
            out,
            count,
            ["generator.blank_every=7"],
            masks=True,
            keypoints=True,
        )
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
