"""The paper's set-up: an LLM writes the prompts, a pool of WebUI servers paints them.

Both ends are fake servers on 127.0.0.1 that speak the real wire formats.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack

import pytest
from fakes.llm_server import FakeLLMServer
from fakes.webui_server import FakeWebUIServer
from PIL import Image

PROVIDERS = ("openai", "anthropic")
KEY_ENV = "CHATROOM_TEST_LLM_KEY"


@pytest.fixture
def llm(monkeypatch):
    with FakeLLMServer() as server:
        monkeypatch.setenv(KEY_ENV, server.key)
        yield server


@pytest.fixture
def servers():
    with ExitStack() as stack:
        yield [
            stack.enter_context(FakeWebUIServer(mode, delay=0.02))
            for mode in ("new", "new", "old")
        ]


def overrides(llm, provider, servers, **generator):
    prompter = {
        "use": "llm",
        "provider": provider,
        "base_url": llm.base_url(provider),
        "api_key_env": KEY_ENV,
        "retry_wait": 0.01,
    }
    generator = {
        "use": "webui",
        "servers": [s.url for s in servers],
        "model": "majicmixRealistic_v6",
        "retry_wait": 0.01,
        "health_interval": 0.05,
        "stall_timeout": 0.5,
        **generator,
    }
    return [f"prompter.{k}={json.dumps(v)}" for k, v in prompter.items()] + [
        f"generator.{k}={json.dumps(v)}" for k, v in generator.items()
    ]


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def check_dataset(out, llm, count=20):
    records = rows(out / "metadata.jsonl")
    assert len(records) == count and len({r["item_id"] for r in records}) == count
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{r['item_id']}.png" for r in records
    )
    prompts = {p["index"]: p for p in rows(out / "prompts.jsonl")}
    for record in records:
        assert record["prompt"] == prompts[record["index"]]["prompt"]
        assert record["prompt_writer"] == "llm"
        for entry in record["bank_entries"]:
            assert entry["value"] in record["prompt"]
        with Image.open(out / record["file_name"]) as image:
            assert image.size == (128, 192)
    for path in out.rglob("*"):
        if path.is_file():
            assert llm.key.encode() not in path.read_bytes(), path
    return records


@pytest.mark.parametrize("provider", PROVIDERS)
def test_llm_prompts_and_three_webui_servers_write_20_records(
    chatroom_run, few_refs, llm, servers, provider
):
    summary, out = chatroom_run(
        few_refs, count=20, overrides=overrides(llm, provider, servers)
    )

    assert summary.status == "complete" and summary.failed == 0
    check_dataset(out, llm)
    assert all(s.images_made() > 0 for s in servers)
    run = json.loads((out / "run.json").read_text())
    assert run["components"]["prompter:prompter"]["usage"]["calls"] >= 3
    assert run["components"]["generator:generator"]["usage"]["images"] == 20


@pytest.mark.parametrize("provider", PROVIDERS)
def test_with_faults_at_both_ends_the_run_still_gives_20_records(
    chatroom_run, few_refs, llm, servers, provider
):
    llm.faults.extend(["rate_limit", "fenced", "server_error", "malformed", "prose"])
    first, second, _ = servers
    first.faults.extend(["server_error", "unavailable", "wrong_size"])

    def kill_after_three_images():
        while second.images_made() < 3:
            time.sleep(0.005)
        second.kill()

    killer = threading.Thread(target=kill_after_three_images, daemon=True)
    killer.start()
    summary, out = chatroom_run(
        few_refs, count=20, overrides=overrides(llm, provider, servers)
    )
    killer.join(5)

    assert summary.status == "complete"
    check_dataset(out, llm)
    assert not second.alive
    assert not llm.faults and not first.faults  # every fault was met and got past
    for failure in rows(out / "failures.jsonl"):
        assert failure["reason"]
