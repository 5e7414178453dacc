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
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_runs import make_run  # noqa: E402


def bench(count: int, width: int, height: int, masks: bool, repeat: int) -> dict:
    from chatroom.export import export_run

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        made = make_run(
            out,
            count,
            [f"generator.width={width}", f"generator.height={height}"],
            masks=masks,
        )
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
