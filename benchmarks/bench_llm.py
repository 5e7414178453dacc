"""LLM calls and wall time for 100 prompts: several prompts a call against one a call.

    python benchmarks/bench_llm.py                  # 100 prompts, 0.3 s a request
    python benchmarks/bench_llm.py -n 200 --latency 0.5 --json out.json

Runs the ``llm`` prompter against the fake OpenAI server of the tests (on 127.0.0.1)
with a fixed latency a request, so the numbers show what batching and concurrency
save, not how fast a real model writes. Tokens are the fake's estimates (four
characters a token); cost uses the gpt-3.5-turbo list price.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.llm_server import FakeLLMServer  # noqa: E402

KEY_ENV = "CHATROOM_BENCH_LLM_KEY"
CASES = [  # (prompts_per_call, concurrency)
    (1, 1),
    (8, 1),
    (1, 4),
    (8, 4),
]


def plan(count: int, domain):
    from chatroom.models import BankEntry, PlanItem

    attributes = [q.name for q in domain.attributes]
    return [
        PlanItem(
            index=i,
            item_id=f"bench{i:05d}",
            seed=i,
            entries=[
                BankEntry(
                    attribute=a,
                    value=f"{a} value {(i * 7 + n) % 11}",
                    reference=f"r{n}",
                )
                for n, a in enumerate(attributes)
            ],
        )
        for i in range(count)
    ]


def run_case(count: int, per_call: int, concurrency: int, latency: float) -> dict:
    from chatroom.components import Context, validate_options
    from chatroom.domain import load_pack
    from chatroom.domains import fashion
    from chatroom.plugins.llm_prompter import LLMPrompter

    domain = load_pack(Path(fashion.__file__).parent)
    with FakeLLMServer() as llm:
        llm.delay = latency
        os.environ[KEY_ENV] = llm.key
        options = validate_options(
            LLMPrompter,
            "prompter",
            {
                "base_url": llm.base_url("openai"),
                "api_key_env": KEY_ENV,
                "prompts_per_call": per_call,
                "concurrency": concurrency,
            },
        )
        prompter = LLMPrompter(options, Context(domain))
        items = plan(count, domain)
        batch = options.batch_size  # what the engine hands over at once
        started = time.perf_counter()
        specs = []
        for i in range(0, count, batch):
            specs += prompter.write(items[i : i + batch], domain)
        seconds = time.perf_counter() - started
        prompter.close()
        assert len(specs) == count
        usage = prompter.usage()
        return {
            "prompts": count,
            "prompts_per_call": per_call,
            "concurrency": concurrency,
            "calls": llm.calls(),
            "seconds": round(seconds, 2),
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "cost_usd": usage["cost_usd"],
            "duplicates_asked_again": usage.get("duplicates", 0),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--prompts", type=int, default=100)
    parser.add_argument("--latency", type=float, default=0.3, help="seconds a call")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    os.environ.setdefault("CHATROOM_LOOPBACK_ONLY", "1")

    rows = [run_case(args.prompts, p, c, args.latency) for p, c in CASES]
    header = f"{'per call':>8} {'workers':>7} {'calls':>5} {'seconds':>7} "
    header += f"{'tokens in':>9} {'tokens out':>10} {'cost $':>8}"
    print(header)
    for row in rows:
        print(
            f"{row['prompts_per_call']:>8} {row['concurrency']:>7} {row['calls']:>5} "
            f"{row['seconds']:>7.2f} {row['prompt_tokens']:>9} "
            f"{row['completion_tokens']:>10} {row['cost_usd']:>8.5f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
