"""The LLM prompter against a fake OpenAI / Anthropic server on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import math

import pytest
from fakes.llm_server import FakeLLMServer

from chatroom.errors import ConfigError, MissingDependency, QuotaExhausted
from chatroom.plugins import llm_prompter, remote
from chatroom.plugins.llm_prompter import NearDuplicates, parse_reply

PROVIDERS = ("openai", "anthropic")
KEY_ENV = "CHATROOM_TEST_LLM_KEY"
TRANSPORT_FAULTS = [
    "rate_limit",
    "server_error",
    "unavailable",
    "overloaded",
    "truncated",
    "malformed",
    "timeout",
]


@pytest.fixture
def llm(monkeypatch):
    """A fake LLM server, and its key in the environment."""
    with FakeLLMServer() as server:
        monkeypatch.setenv(KEY_ENV, server.key)
        yield server


def overrides(llm, provider, **options):
    options = {
        "use": "llm",
        "provider": provider,
        "base_url": llm.base_url(provider),
        "api_key_env": KEY_ENV,
        "retry_wait": 0.01,
        **options,
    }
    return [f"prompter.{k}={json.dumps(v)}" for k, v in options.items()]


def records(out):
    lines = (out / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_no_key(out, key, *texts):
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    for text in texts:
        assert key not in text


# --- the fake speaks the real wire formats -----------------------------------------


def test_fake_replies_parse_with_the_client_libraries(llm):
    import anthropic
    import openai
    from anthropic.types import Message
    from openai.types.chat import ChatCompletion

    user = '```json\n[{"item": "i1", "attributes": {"garment": "red coat"}}]\n```'
    chat = openai.OpenAI(api_key=llm.key, base_url=llm.base_url("openai"))
    reply = chat.chat.completions.create(
        model="gpt-3.5-turbo", messages=[{"role": "user", "content": user}]
    )
    assert isinstance(reply, ChatCompletion)
    assert "red coat" in parse_reply(reply.choices[0].message.content)["i1"]
    assert reply.usage.completion_tokens > 0

    claude = anthropic.Anthropic(api_key=llm.key, base_url=llm.base_url("anthropic"))
    message = claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=200,
        messages=[{"role": "user", "content": user}],
    )
    assert isinstance(message, Message)
    assert message.stop_reason == "end_turn"
    assert "red coat" in parse_reply(message.content[0].text)["i1"]


# --- runs --------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_run_of_20_records(chatroom_run, few_refs, llm, provider):
    summary, out = chatroom_run(few_refs, count=20, overrides=overrides(llm, provider))

    assert summary.status == "complete"
    rows = records(out)
    assert len(rows) == 20
    specs = [
        json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()
    ]
    model = "gpt-3.5-turbo" if provider == "openai" else "claude-haiku-4-5"
    by_index = {s["index"]: s for s in specs}
    for row in rows:
        spec = by_index[row["index"]]
        assert row["prompt"] == spec["prompt"]
        assert row["bank_entries"] and row["bank_entries"] == spec["entries"]
        for entry in row["bank_entries"]:
            assert entry["value"] in row["prompt"]
        assert spec["writer"] == "llm" and spec["model"] == model
        assert spec["fewshot_ids"][0].startswith("fashion-sd15-")
        assert spec["tokens"] > 0
    assert len({r["prompt"] for r in rows}) == 20

    # Every request asked for at most 8 items, and together for exactly the 20.
    asked = [r["items"] for r in llm.requests]
    assert max(asked) <= 8 and sum(asked) == 20
    assert all(r["provider"] == provider for r in llm.requests)
    usage = json.loads((out / "run.json").read_text())["components"][
        "prompter:prompter"
    ]
    assert usage["usage"]["calls"] == len(llm.requests)
    assert usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["cost_usd"] > 0
    assert usage["model"] == model and usage["base_url"] == llm.base_url(provider)
    assert "estimate" in usage["prices_note"]
    assert_no_key(out, llm.key)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_calls_for_20_prompts_are_ceil_20_over_8(chatroom_run, few_refs, llm, provider):
    summary, out = chatroom_run(
        few_refs, count=20, overrides=overrides(llm, provider), stop_after="prompts"
    )
    assert summary.status == "stopped after prompts"
    assert llm.calls() == math.ceil(20 / 8)
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 20


@pytest.mark.parametrize("provider", PROVIDERS)
def test_transport_faults_are_retried(chatroom_run, few_refs, llm, provider, caplog):
    caplog.set_level(logging.DEBUG)
    llm.faults.extend(TRANSPORT_FAULTS)
    llm.slow_seconds = 1.0
    summary, out = chatroom_run(
        few_refs,
        count=20,
        overrides=overrides(
            llm,
            provider,
            concurrency=1,
            timeout=0.4,
            max_retries=len(TRANSPORT_FAULTS),
            duplicate_threshold=1.0,  # exact call count: no re-asks for clashes
        ),
        stop_after="prompts",
    )
    assert summary.status == "stopped after prompts"
    specs = (out / "prompts.jsonl").read_text().splitlines()
    assert len(specs) == 20
    # Each fault costs exactly one more call.
    assert llm.calls() == math.ceil(20 / 8) + len(TRANSPORT_FAULTS)
    assert_no_key(out, llm.key, caplog.text)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bad_replies_are_asked_again(chatroom_run, few_refs, llm, provider):
    # In order, one worker: 8 items cut at the limit -> two halves of 4 (fenced,
    # prose); 8 items with one missing -> that one again, which comes back as an
    # earlier prompt -> again, with the clash named; then the last 4.
    llm.faults.extend(["length", "fenced", "prose", "missing", "duplicate"])
    summary, out = chatroom_run(
        few_refs,
        count=20,
        overrides=overrides(llm, provider, concurrency=1),
        stop_after="prompts",
    )
    specs = [
        json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()
    ]
    assert sorted(s["index"] for s in specs) == list(range(20))
    for spec in specs:
        for entry in spec["entries"]:
            assert entry["value"] in spec["prompt"]
    assert len({s["prompt"] for s in specs}) == 20
    assert llm.calls() == 7
    usage = json.loads((out / "run.json").read_text())["components"][
        "prompter:prompter"
    ]
    assert usage["usage"]["truncated"] == 1
    assert usage["usage"]["duplicates"] == 1
    assert "duplicates_kept" not in usage["usage"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_faults_in_a_full_run_still_give_20_records(
    chatroom_run, few_refs, llm, provider
):
    llm.faults.extend(
        ["rate_limit", "fenced", "server_error", "malformed", "prose", "overloaded"]
        + ["missing", "truncated", "refusal", "unavailable"]
    )
    summary, out = chatroom_run(few_refs, count=20, overrides=overrides(llm, provider))
    assert summary.status == "complete"
    assert len(records(out)) == 20
    assert not (out / "failures.jsonl").read_text().strip()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refusal_is_asked_once_more(chatroom_run, few_refs, llm, provider):
    llm.faults.extend(["refusal", "ok", "refusal_text", "ok"])
    summary, out = chatroom_run(
        few_refs,
        count=16,
        overrides=overrides(llm, provider, concurrency=1),
        stop_after="prompts",
    )
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 16
    usage = json.loads((out / "run.json").read_text())["components"][
        "prompter:prompter"
    ]
    assert usage["usage"]["refusals"] == 2
    assert llm.calls() == 4  # each chunk: refused (by the API, as text), answered


def test_items_the_model_keeps_refusing_fail_with_the_reason(
    chatroom_run, few_refs, llm
):
    llm.always = "refusal"
    summary, out = chatroom_run(few_refs, count=4, overrides=overrides(llm, "openai"))
    assert summary.written == 0 and summary.failed > 0
    failures = [
        json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()
    ]
    assert failures and all("the model refused" in f["reason"] for f in failures)
    assert all("can't help" in f["reason"] for f in failures)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_quota_stops_the_run_and_the_same_call_resumes_it(
    chatroom_run, few_refs, llm, provider, caplog
):
    caplog.set_level(logging.DEBUG)
    llm.always = "quota"
    with pytest.raises(QuotaExhausted) as stopped:
        chatroom_run(few_refs, count=20, overrides=overrides(llm, provider))
    message = str(stopped.value)
    assert "no quota or credit left" in message and "\n" not in message
    assert "run the same command again" in message
    # quota errors are not retried: one call per chunk at most
    assert 1 <= llm.calls("quota") <= math.ceil(20 / 8)

    llm.always = None
    summary, out = chatroom_run(few_refs, count=20, overrides=overrides(llm, provider))
    assert summary.status == "complete"
    assert len(records(out)) == 20
    assert_no_key(out, llm.key, caplog.text, message)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_rejected_key_names_the_variable_not_the_key(
    chatroom_run, few_refs, llm, provider, monkeypatch, caplog
):
    wrong = "sk-wrong-key-abcdefghijklmnop"
    monkeypatch.setenv(KEY_ENV, wrong)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as rejected:
        chatroom_run(few_refs, count=4, overrides=overrides(llm, provider))
    message = str(rejected.value)
    assert KEY_ENV in message and "401" in message
    assert wrong not in message and wrong[-6:] not in message
    assert wrong not in caplog.text
    assert llm.calls() == 0  # nothing reached the model, nothing was retried


def test_a_missing_key_for_a_public_api_is_a_config_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    prompter = make_prompter(base_url="", api_key_env="")
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        prompter._key()


def test_retry_after_is_honoured(llm):
    import time

    llm.retry_after = "0.4"
    llm.faults.append("rate_limit")
    prompter = make_prompter(base_url=llm.base_url("openai"))
    started = time.monotonic()
    specs = prompter.write(plan_items(2), fashion())
    assert len(specs) == 2
    assert time.monotonic() - started >= 0.4
    assert prompter.usage()["retried_429"] == 1


def test_concurrency_is_limited_across_the_process(llm):
    llm.delay = 0.15
    url = llm.base_url("openai")
    first = make_prompter(base_url=url, prompts_per_call=1, concurrency=2)
    second = make_prompter(base_url=url, prompts_per_call=1, concurrency=2)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(p.write, plan_items(4), fashion()) for p in (first, second)]
        assert all(len(j.result()) == 4 for j in jobs)
    assert llm.max_in_flight == 2


def test_the_budget_cap_stops_before_the_next_call(llm):
    prompter = make_prompter(
        base_url=llm.base_url("openai"),
        prompts_per_call=2,
        concurrency=1,
        max_cost_usd=1e-6,
    )
    with pytest.raises(QuotaExhausted, match="max_cost_usd"):
        prompter.write(plan_items(4), fashion())
    assert llm.calls() == 1
    assert prompter.usage()["cost_usd"] > 1e-6


def test_a_budget_needs_a_price(llm):
    prompter = make_prompter(
        base_url=llm.base_url("openai"), model="my-local-model", max_cost_usd=1.0
    )
    with pytest.raises(ConfigError, match="prices"):
        prompter.write(plan_items(1), fashion())
    assert llm.calls() == 0


def test_an_unknown_model_has_no_cost(llm):
    prompter = make_prompter(base_url=llm.base_url("openai"), model="llama3:8b")
    prompter.write(plan_items(3), fashion())
    usage = prompter.usage()
    assert usage["cost_usd"] is None and usage["completion_tokens"] > 0
    assert llm.requests[0]["model"] == "llama3:8b"


def test_public_hosts_are_refused_under_tests():
    prompter = make_prompter(base_url="")
    with pytest.raises(ConfigError, match="127.0.0.1"):
        prompter.write(plan_items(1), fashion())
    with pytest.raises(ConfigError, match="127.0.0.1"):
        make_prompter(provider="anthropic").write(plan_items(1), fashion())


def test_a_missing_library_names_the_extra(llm, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "anthropic", None)
    prompter = make_prompter(provider="anthropic", base_url=llm.base_url("anthropic"))
    with pytest.raises(MissingDependency, match=r"chatroom\[anthropic\]"):
        prompter.write(plan_items(1), fashion())


def test_unknown_options_are_refused():
    from chatroom.components import validate_options

    with pytest.raises(ConfigError, match="prompts_per_call"):
        validate_options(llm_prompter.LLMPrompter, "prompter", {"prompts_per_cal": 4})
    options = validate_options(llm_prompter.LLMPrompter, "prompter", {})
    assert options.model == "gpt-3.5-turbo" and options.api_key_env == "OPENAI_API_KEY"
    assert options.batch_size == options.prompts_per_call * options.concurrency


def test_the_request_shows_the_family_examples_and_the_values(llm):
    domain = fashion()
    prompter = make_prompter(base_url=llm.base_url("openai"), family="sdxl")
    system = prompter.system_message(domain)
    sdxl = [s for s in domain.fewshot if s.family == "sdxl"]
    assert all(s.prompt in system for s in sdxl)
    assert not any(s.prompt in system for s in domain.fewshot if s.family == "sd15")
    assert "Stable Diffusion XL" in system and "fashion" in system
    items = plan_items(2)
    user = prompter.user_message({"i1": items[0], "i2": items[1]}, {1: "old"}, domain)
    assert '"garment": "garment 0"' in user and '"too_close_to": "old"' in user
    specs = prompter.write(items, domain)
    assert all(spec.fewshot_ids == [s.id for s in sdxl] for spec in specs)


# --- the parts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '[{"item": "i1", "prompt": "a red coat"}]',
        'Sure!\n```json\n[{"item": "i1", "prompt": "a red coat"}]\n```\nMore?',
        'Here: [{"item": "i1", "prompt": "a red coat"}] - enjoy',
        '{"prompts": [{"item": "i1", "prompt": "  a red\\n coat "}]}',
        '{"item": "i1", "prompt": "a red coat"}',
        '```\n[{"item": "i1", "prompt": "a red coat"}, {"item": "i2"}]\n```',
    ],
)
def test_replies_are_read_however_they_are_wrapped(text):
    assert parse_reply(text) == {"i1": "a red coat"}


def test_item_keys_may_come_back_as_numbers():
    assert parse_reply('[{"item": 3, "prompt": "a red coat"}]') == {"3": "a red coat"}


@pytest.mark.parametrize("text", ["", "I'm sorry, I can't.", "[1, 2", '{"a": 1}'])
def test_replies_without_prompts_give_nothing(text):
    assert parse_reply(text) == {}


def test_near_duplicates_are_found_by_word_sets():
    seen = NearDuplicates(0.9)
    base = ", ".join(f"tag{i}" for i in range(30))
    seen.add(base)
    assert seen.find("(" + base.upper() + ":1.2)") is not None  # weights, case
    assert seen.find(base + ", tag30") is not None  # 30/31 > 0.9
    assert seen.find(base + ", tag30, tag31, tag32, tag33") is None  # 30/34 < 0.9
    assert NearDuplicates(1.0).find(base) is None


def test_errors_are_classified_by_status_and_body():
    class Error(Exception):
        def __init__(self, status, body):
            self.status_code, self.body = status, body

    quota = {"message": "x", "type": "insufficient_quota", "code": "insufficient_quota"}
    assert remote.classify(Error(429, quota)) == "quota"
    assert remote.classify(Error(429, {"type": "requests"})) == "retry"
    billing = {"type": "error", "error": {"type": "billing_error", "message": "m"}}
    assert remote.classify(Error(402, billing)) == "quota"
    assert remote.classify(Error(401, {})) == "auth"
    assert remote.classify(Error(529, {})) == "retry"
    assert remote.classify(Error(400, {"message": "bad"})) == "refused"
    assert remote.classify(ValueError("x")) == "other"


def test_cost_is_estimated_from_the_price_table():
    meter = remote.Meter("gpt-3.5-turbo-0125")
    meter.tokens(1_000_000, 1_000_000)
    assert meter.cost == pytest.approx(2.0)
    assert remote.Meter("gpt-4o-2024-08-06").prices == remote.PRICES["gpt-4o"]
    assert remote.Meter("unknown").cost is None


# --- helpers -----------------------------------------------------------------------


def fashion():
    from pathlib import Path

    from chatroom.domain import load_pack
    from chatroom.domains import fashion as pack

    return load_pack(Path(pack.__file__).parent)


def plan_items(count):
    from chatroom.models import BankEntry, PlanItem

    return [
        PlanItem(
            index=i,
            item_id=f"item{i}",
            seed=i,
            entries=[
                BankEntry(attribute="garment", value=f"garment {i}", reference="r1"),
                BankEntry(attribute="color", value=f"shade {i % 3}", reference="r2"),
            ],
        )
        for i in range(count)
    ]


def make_prompter(**options):
    from chatroom.components import Context, validate_options

    options = {"api_key_env": KEY_ENV, "retry_wait": 0.01, **options}
    options = {k: v for k, v in options.items() if v != ""}  # "": the default
    parsed = validate_options(llm_prompter.LLMPrompter, "prompter", options)
    return llm_prompter.LLMPrompter(parsed, Context(fashion()))
