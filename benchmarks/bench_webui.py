"""Images a second from a pool of WebUI servers, against the pool's ceiling and a loop.

    python benchmarks/bench_webui.py                 # 4 servers, 0.5 s an image, 40
    python benchmarks/bench_webui.py -n 80 --servers 8 --latency 0.25 --json out.json

Runs the ``webui`` generator alone against the fake WebUI servers of the tests (on
127.0.0.1), each taking a fixed time an image, and hands it ``batch_size`` specs a
call as the engine does. The ceiling is servers / latency (4 / 0.5 s = 8 images/s).
The baseline is a plain sequential loop: webuiapi's ``txt2img`` on one server after
another, one image at a time. Optionally one server is killed a third of the way in
(``--kill``) to show what moving its jobs costs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.webui_server import FakeWebUIServer  # noqa: E402

SIZE = {"width": 512, "height": 768}


def specs(count: int):
    from chatroom.models import PromptSpec

    return [
        PromptSpec(
            index=i,
            item_id=f"bench{i:05d}",
            prompt=f"photo of a woman in a midi dress, look {i}",
            negative_prompt="lowres",
        )
        for i in range(count)
    ]


def pool_case(servers, count: int, kill: bool) -> dict:
    from chatroom.components import Context, ItemFailed, validate_options
    from chatroom.plugins.webui_generator import WebUIGenerator

    options = validate_options(
        WebUIGenerator,
        "generator",
        {
            "servers": [s.url for s in servers],
            "stall_timeout": 5.0,
            "retry_wait": 0.05,
            **SIZE,
        },
    )
    generator = WebUIGenerator(options, Context(None))
    items = specs(count)
    batch = options.batch_size  # what the engine hands over at once
    generator.generate(items[:batch], list(range(batch)))  # set-up: read the lists
    if kill:
        victim = servers[-1]
        threading.Thread(
            target=_kill_after, args=(victim, count // (3 * len(servers))), daemon=True
        ).start()
    started = time.perf_counter()
    made = failed = 0
    for i in range(0, count, batch):
        chunk = items[i : i + batch]
        for result in generator.generate(chunk, [1000 + c.index for c in chunk]):
            failed += isinstance(result, ItemFailed)
            made += not isinstance(result, ItemFailed)
    seconds = time.perf_counter() - started
    usage = generator.usage()
    generator.close()
    return {
        "case": "pool" + (" (one server killed)" if kill else ""),
        "images": made,
        "failed": failed,
        "seconds": round(seconds, 2),
        "images_per_s": round(made / seconds, 2),
        "retries": usage["retries"],
    }


def _kill_after(server, images: int) -> None:
    start = server.images_made()
    while server.images_made() - start < images:
        time.sleep(0.01)
    server.kill()


def loop_case(servers, count: int) -> dict:
    """webuiapi directly, one request at a time, servers in turn."""
    import webuiapi

    clients = [webuiapi.WebUIApi(baseurl=s.url + "/sdapi/v1") for s in servers]
    started = time.perf_counter()
    for i, spec in enumerate(specs(count)):
        clients[i % len(clients)].txt2img(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            seed=1000 + i,
            sampler_name="DPM++ 2M SDE",
            scheduler="karras",
            steps=30,
            cfg_scale=4.0,
            **SIZE,
        )
    seconds = time.perf_counter() - started
    return {
        "case": "sequential loop",
        "images": count,
        "failed": 0,
        "seconds": round(seconds, 2),
        "images_per_s": round(count / seconds, 2),
        "retries": 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--images", type=int, default=40)
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.5, help="seconds an image")
    parser.add_argument("--kill", action="store_true", help="also kill one mid-run")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("CHATROOM_LOOPBACK_ONLY", "1")

    rows = []
    cases = [("loop", False), ("pool", False)] + ([("pool", True)] if args.kill else [])
    for case, kill in cases:
        with ExitStack() as stack:
            servers = [
                stack.enter_context(FakeWebUIServer("new", delay=args.latency))
                for _ in range(args.servers)
            ]
            if case == "loop":
                rows.append(loop_case(servers, args.images))
            else:
                rows.append(pool_case(servers, args.images, kill))
    ceiling = args.servers / args.latency
    print(
        f"{args.servers} servers, {args.latency:g} s an image, {args.images} images: "
        f"ceiling {ceiling:g} images/s"
    )
    print(
        f"{'case':<28} {'images':>6} {'failed':>6} {'seconds':>7} {'img/s':>6} "
        f"{'of ceiling':>10}"
    )
    for row in rows:
        row["of_ceiling"] = round(row["images_per_s"] / ceiling, 3)
        print(
            f"{row['case']:<28} {row['images']:>6} {row['failed']:>6} "
            f"{row['seconds']:>7.2f} {row['images_per_s']:>6.2f} "
            f"{row['of_ceiling']:>10.1%}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
