"""The local executor against the Ray executor; results go to docs/benchmarks.md.

    python benchmarks/bench_executors.py speed    # records/s, smoke models
    python benchmarks/bench_executors.py memory   # peak memory, 100 and 1,000 records

``speed`` runs the smoke models (tiny random-weight SD 1.5 and BLIP-2 captions) on
the CPU, without the hires pass, with a static attribute bank. ``memory`` uses the
fake generator of ``chatroom.testing`` (a seeded noise picture, no model), so 1,000
records take minutes; on Ray it runs on two actors. Peak memory is the largest sum,
sampled every 0.25 s, over the driver and every process it started (Ray's own
services and its workers): resident set (RSS, which counts shared pages once per
process) and proportional set (PSS, which shares them out).

Ray runs inside a fresh network namespace (``unshare -n``; run as root), because it
listens on every interface.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).parents[1]
REFS = (
    Path(os.environ.get("CHATROOM_SHARED", ROOT.parent / "shared"))
    / "data/reference/fashion"
)
PY = sys.executable
RESULTS = ROOT / "benchmarks" / "results.json"
NAMESPACE = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]

DRIVER = textwrap.dedent(
    """
    import json, sqlite3, sys
    from chatroom.engine import Engine
    from chatroom.resolve import Request
    from chatroom.testing import fake_plugins

    config, refs, out, count, executor = sys.argv[1:6]
    request = Request(
        config,
        {"references": refs, "count": int(count), "output": out, "executor": executor},
        sys.argv[6:],
    )
    summary = Engine(request, plugins=fake_plugins()).run()
    db = sqlite3.connect(f"{out}/journal.sqlite")
    times = sorted(t for (t,) in db.execute(
        "SELECT updated FROM items WHERE status='written'"))
    print(json.dumps({"written": summary.written, "seconds": summary.seconds,
                      "first": times[0], "last": times[-1]}))
    """
)

BANK = """
[extractor]
use = "static"
[extractor.values]
garment = ["midi dress", "t-shirt and jeans", "long coat", "sequin dress"]
color = ["red", "navy", "white", "black"]
"""


def smoke_config(folder: Path) -> Path:
    subprocess.run(
        [PY, "-m", "chatroom.cli", "smoke-models", str(folder)],
        check=True,
        capture_output=True,
    )
    sd15, blip2 = (folder / "sd15").as_posix(), (folder / "blip2").as_posix()
    path = folder / "bench.toml"
    path.write_text(
        BANK
        + f"""
[generator]
use = "diffusers"
model = "{sd15}"
steps = 2
cfg_scale = 4.0
width = 64
height = 96
clip_skip = 2
device = "cpu"
dtype = "float32"
threads = 1
[generator.hires]
enabled = false

[annotators.captions]
use = "blip2_captions"
model = "{blip2}"
mode = "observe"
max_new_tokens = 8
device = "cpu"
"""
    )
    return path


def fake_config(folder: Path) -> Path:
    path = folder / "fake.toml"
    path.write_text(
        BANK
        + """
[generator]
use = "fake"
width = 64
height = 96
[annotators.captions]
enabled = false
"""
    )
    return path


class Sampler:
    """Peak total RSS and PSS of a process and all its descendants."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.rss = self.pss = 0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = pss = count = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                tree = []
            for proc in tree:
                try:
                    info = proc.memory_full_info()
                except psutil.Error:
                    continue
                rss, pss, count = rss + info.rss, pss + info.pss, count + 1
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self.processes = max(self.processes, count)
            self._stop.wait(0.25)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(config: Path, out: Path, count: int, executor: str, *overrides) -> dict:
    script = out.parent / "driver.py"
    script.write_text(DRIVER)
    command = [PY, str(script), str(config), str(REFS), str(out), str(count)]
    command += [executor, *overrides]
    if executor == "ray":
        command = NAMESPACE + command
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    sampler = Sampler(proc.pid)
    stdout, stderr = proc.communicate()
    sampler.stop()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{executor} run failed:\n{stderr[-3000:]}")
    done = json.loads(stdout.strip().splitlines()[-1])
    steady = (done["written"] - 1) / max(done["last"] - done["first"], 1e-9)
    return {
        "records": done["written"],
        "whole command (s)": round(wall, 1),
        "records/s, whole command": round(done["written"] / wall, 2),
        "records/s, first to last record": round(steady, 2),
        "peak RSS, all processes (MB)": round(sampler.rss / 2**20),
        "peak PSS, all processes (MB)": round(sampler.pss / 2**20),
        "processes": sampler.processes,
    }


def bench_speed(tmp: Path, count: int) -> dict:
    config = smoke_config(tmp / "models")
    out: dict = {"records": count, "cores": os.cpu_count()}
    out["local"] = run(config, tmp / "local", count, "local")
    # two generator actors and one captions actor: one thread each
    out["ray"] = run(
        config, tmp / "ray", count, "ray", "ray.actors.annotators.captions=1"
    )
    return out


def bench_memory(tmp: Path, sizes: tuple[int, ...]) -> dict:
    config = fake_config(tmp)
    out: dict = {"generator": "chatroom.testing fake (no model)"}
    for executor, extra in (("local", []), ("ray", ["ray.actors.generator=2"])):
        for size in sizes:
            out[f"{executor}, {size} records"] = run(
                config, tmp / f"{executor}-{size}", size, executor, *extra
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", nargs="+", choices=["speed", "memory"])
    parser.add_argument("--count", type=int, default=100, help="records for speed")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for which in args.which:
        with tempfile.TemporaryDirectory() as tmp:
            if which == "speed":
                result = bench_speed(Path(tmp), args.count)
            else:
                result = bench_memory(Path(tmp), (100, 1000))
        result["measured"] = time.strftime("%Y-%m-%d")
        results[f"executors {which}"] = result
        print(which, json.dumps(result, indent=2))
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
