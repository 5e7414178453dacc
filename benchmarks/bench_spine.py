"""Benchmarks of the spine; results go to docs/benchmarks.md.

    python benchmarks/bench_spine.py startup   # chatroom --help against python -c pass
    python benchmarks/bench_spine.py resume       # a finished run started again
    python benchmarks/bench_spine.py overhead     # engine against a plain loop
    python benchmarks/bench_spine.py memory       # peak memory, 50 against 500 records

All use the smoke models (tiny random-weight models) on the CPU and the shared photos.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
REFS = (
    Path(os.environ.get("CHATROOM_SHARED", ROOT.parent / "shared")) / "data/reference"
)
PY = sys.executable
RESULTS = ROOT / "benchmarks" / "results.json"


def timed(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, **kwargs)
    return time.perf_counter() - start


def smoke_models(folder: Path) -> Path:
    subprocess.run(
        [PY, "-m", "chatroom.cli", "smoke-models", str(folder)],
        check=True,
        capture_output=True,
    )
    return folder / "smoke.toml"


def bench_startup(repeat: int = 20) -> dict:
    chatroom = [PY, "-m", "chatroom.cli", "--help"]
    script = str(Path(PY).parent / "chatroom")
    base = [timed([PY, "-c", "pass"]) for _ in range(repeat)]
    cli = [timed([script, "--help"]) for _ in range(repeat)]
    module = [timed(chatroom) for _ in range(repeat)]
    return {
        "python -c pass (median s)": round(statistics.median(base), 3),
        "chatroom --help (median s)": round(statistics.median(cli), 3),
        "python -m chatroom.cli --help (median s)": round(statistics.median(module), 3),
        "extra over python (s)": round(
            statistics.median(cli) - statistics.median(base), 3
        ),
        "target": "under 0.3 s more than python -c pass",
    }


def run_cmd(config: Path, out: Path, count: int, *extra: str) -> list[str]:
    return [
        PY,
        "-m",
        "chatroom.cli",
        "run",
        "-c",
        str(config),
        "--domain",
        "fashion",
        "--references",
        str(REFS / "fashion"),
        "-n",
        str(count),
        "-o",
        str(out),
        *extra,
    ]


def bench_resume(tmp: Path) -> dict:
    config = smoke_models(tmp / "models")
    out = tmp / "out"
    first = timed(run_cmd(config, out, 8))
    again = [timed(run_cmd(config, out, 8)) for _ in range(3)]
    return {
        "first run, 8 records (s)": round(first, 2),
        "finished run started again (median s)": round(statistics.median(again), 2),
        "target": "under 10 s",
    }


def bench_overhead(tmp: Path, count: int = 24) -> dict:
    """Per-record time of the engine against a loop calling the same components."""
    config = smoke_models(tmp / "models")
    out = tmp / "engine"
    # extraction is run once first, so both sides time only the per-record work
    subprocess.run(
        run_cmd(config, out, count, "--stop-after", "attributes"),
        check=True,
        capture_output=True,
    )
    engine_s = timed(run_cmd(config, out, count))
    loop = subprocess.run(
        [
            PY,
            str(Path(__file__).with_name("plain_loop.py")),
            str(config),
            str(REFS / "fashion"),
            str(out / "attributes.jsonl"),
            str(count),
            str(tmp / "loop"),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    loop_s = json.loads(loop.stdout.strip().splitlines()[-1])["seconds"]
    return {
        "records": count,
        "engine, whole command (s)": round(engine_s, 2),
        "plain loop, whole script (s)": round(loop_s, 2),
        "engine per record (s)": round(engine_s / count, 4),
        "plain loop per record (s)": round(loop_s / count, 4),
        "overhead": f"{(engine_s / loop_s - 1) * 100:+.1f}%",
        "target": "within 10%",
    }


def peak_rss_mb(cmd: list[str]) -> float:
    proc = subprocess.run(
        [
            PY,
            "-c",
            (
                "import resource, subprocess, sys; "
                "subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            ),
            *cmd,
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout.strip()) / 1024


def bench_memory(tmp: Path, small: int = 50, large: int = 500) -> dict:
    config = smoke_models(tmp / "models")
    # no hires pass and one step keep 500 records short; the data path is the same
    fast = ["--set", "generator.steps=1", "--set", "generator.hires.enabled=false"]
    small_mb = peak_rss_mb(run_cmd(config, tmp / "small", small, *fast))
    large_mb = peak_rss_mb(run_cmd(config, tmp / "large", large, *fast))
    return {
        f"peak RSS, {small} records (MB)": round(small_mb, 1),
        f"peak RSS, {large} records (MB)": round(large_mb, 1),
        "growth": f"{(large_mb / small_mb - 1) * 100:+.1f}%",
        "target": "within 15%",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "which", nargs="+", choices=["startup", "resume", "overhead", "memory"]
    )
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    resource.setrlimit(
        resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)
    )
    for which in args.which:
        with tempfile.TemporaryDirectory() as tmp:
            if which == "startup":
                result = bench_startup()
            else:
                result = globals()[f"bench_{which}"](Path(tmp))
        result["measured"] = time.strftime("%Y-%m-%d")
        results[which] = result
        print(which, json.dumps(result, indent=2))
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
