"""The WebUI generator against fake WebUI servers on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack

import pytest
from fakes.webui_server import NEW_SAMPLERS, OLD_SAMPLERS, SCHEDULERS, FakeWebUIServer
from PIL import Image

from chatroom.components import Context, ItemFailed
from chatroom.errors import ConfigError, MissingDependency
from chatroom.models import PromptSpec
from chatroom.plugins import webui_generator as webui
from chatroom.plugins.webui_generator import (
    ServersDown,
    WebUIGenerator,
    WebUIOptions,
    choose_sampler,
)

MODEL = "majicmixRealistic_v6"
TITLE = "majicmixRealistic_v6.safetensors [e4a30e4607]"
FAST = {"retry_wait": 0.01, "health_interval": 0.05, "stall_timeout": 0.5}


@pytest.fixture
def servers():
    """Three fake servers: two of the new API (1.9+), one of the old."""
    with ExitStack() as stack:
        yield [
            stack.enter_context(FakeWebUIServer(mode, delay=0.02))
            for mode in ("new", "new", "old")
        ]


def overrides(servers, **options):
    options = {
        "use": "webui",
        "servers": [s.url for s in servers],
        "model": MODEL,
        **FAST,
        **options,
    }
    return [f"generator.{k}={json.dumps(v)}" for k, v in options.items()]


def records(out):
    lines = (out / "metadata.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def failures(out):
    path = out / "failures.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def generator(servers, **options) -> WebUIGenerator:
    base = {"servers": [s.url for s in servers], "width": 64, "height": 96, **FAST}
    return WebUIGenerator(
        WebUIOptions.model_validate({**base, **options}), Context(None)
    )


def specs(count: int, start: int = 0) -> list[PromptSpec]:
    return [
        PromptSpec(
            index=i, item_id=f"item-{i}", prompt=f"photo {i}", negative_prompt=""
        )
        for i in range(start, start + count)
    ]


def served(servers):
    """prompt -> (server, payload) of every request that made an image."""
    out = {}
    for server in servers:
        for request in server.requests:
            if request["fault"] is None:
                out[request["payload"]["prompt"]] = (server, request["payload"])
    return out


# --- a fashion run -------------------------------------------------------------------


def test_a_fashion_run_of_20_records_on_three_servers(chatroom_run, few_refs, servers):
    servers[2].seed_offset = 1000  # this one reports a seed of its own choosing
    summary, out = chatroom_run(few_refs, count=20, overrides=overrides(servers))

    assert summary.status == "complete"
    rows = records(out)
    assert len(rows) == 20 and len({r["item_id"] for r in rows}) == 20
    by_prompt = served(servers)
    assert all(s.images_made() > 0 for s in servers)  # the work was shared
    for row in rows:
        server, payload = by_prompt[row["prompt"]]
        settings = row["settings"]
        # the seed the server reported in info, not the one sent
        assert row["seed"] == settings["seed"] == payload["seed"] + server.seed_offset
        # FAKE_CONFIG's 64x96 with the pack's hires fix x2 (R-ESRGAN 4x+)
        with Image.open(out / row["file_name"]) as image:
            assert image.size == (128, 192)
        assert (settings["width"], settings["height"]) == (64, 96)
        assert settings["hires"]["upscaler"] == "R-ESRGAN 4x+"
        assert settings["sampler"] == "DPM++ 2M SDE Karras"
        assert settings["model"] == TITLE and settings["clip_skip"] == 2
        assert payload["override_settings"]["CLIP_stop_at_last_layers"] == 2
        assert payload["enable_hr"] and payload["hr_scale"] == 2.0
        if server.mode == "new":
            assert (payload["sampler_name"], payload["scheduler"]) == (
                "DPM++ 2M SDE",
                "karras",
            )
        else:
            assert payload["sampler_name"] == "DPM++ 2M SDE Karras"
            assert payload["scheduler"] is None
            assert "the server used seed" in row["warnings"][0]
    # one job per server at a time
    assert all(s.max_in_flight == 1 for s in servers)

    run = json.loads((out / "run.json").read_text())
    component = run["components"]["generator:generator"]
    assert component["usage"]["images"] == 20
    described = {s["url"]: s for s in component["servers"]}
    assert described[servers[2].url]["schedulers_endpoint"] is False
    assert described[servers[0].url]["scheduler"] == "karras"


def test_faults_and_a_server_killed_mid_run_still_give_20_records(
    chatroom_run, few_refs, servers
):
    first, second, third = servers
    first.faults.extend(
        ["server_error", "unavailable", "wrong_size", "html", "no_images", "bad_info"]
    )
    for server in servers:  # these items fail everywhere: recorded, then replaced
        server.fail_if = lambda seed: seed % 5 == 0

    def kill_after_three_images():
        while second.images_made() < 3:
            time.sleep(0.005)
        second.kill()

    killer = threading.Thread(target=kill_after_three_images, daemon=True)
    killer.start()
    summary, out = chatroom_run(
        few_refs, count=20, overrides=overrides(servers, max_retries=2)
    )
    killer.join(5)

    assert summary.status == "complete"
    rows = records(out)
    assert len(rows) == 20 and len({r["item_id"] for r in rows}) == 20
    assert not second.alive and second.images_made() >= 3
    assert not first.faults  # every fault was met, and retried on another server
    failed = failures(out)
    assert failed, "some seeds fail on every server"
    assert summary.failed == len(failed)
    for failure in failed:
        assert failure["stage"] == "generate" and failure["kind"] == "item"
        assert failure["reason"].startswith("no image after 3 attempts: ")
        assert "500 RuntimeError" in failure["reason"]
        assert "127.0.0.1" in failure["reason"]
    for row in rows:
        assert row["seed"] % 5 != 0
        with Image.open(out / row["file_name"]) as image:
            assert image.size == (128, 192)
    usage = json.loads((out / "run.json").read_text())["components"][
        "generator:generator"
    ]["usage"]
    assert usage["retries"] >= 6 and usage["server_failures"] >= 6


@pytest.mark.parametrize(
    "option, value, offered",
    [
        ("sampler", "DPM++ 9M Turbo", "samplers: DPM++ 2M, DPM++ SDE, DPM++ 2M SDE"),
        ("scheduler", "Cosine", "schedulers: Automatic, Uniform, Karras"),
        ("hires.upscaler", "4x-UltraSharp", "it offers: None, Lanczos, Nearest"),
        ("model", "dreamshaper_8", "it offers: majicmixRealistic_v6.safetensors"),
    ],
)
def test_what_a_server_lacks_fails_before_the_first_image(
    chatroom_run, few_refs, servers, option, value, offered
):
    with pytest.raises(ConfigError) as error:
        chatroom_run(few_refs, count=4, overrides=overrides(servers, **{option: value}))
    message = str(error.value)
    assert value in message and offered in message, message
    assert "generator (webui)" in message and servers[0].url in message
    assert not any(s.requests for s in servers)


def test_an_old_server_gets_sampler_and_scheduler_as_one_name(servers):
    gen = generator(
        [servers[2]], sampler="DPM++ 2M SDE", scheduler="Karras", clip_skip=2
    )
    try:
        [candidate] = gen.generate(specs(1), [42])
    finally:
        gen.close()
    payload = servers[2].requests[0]["payload"]
    assert payload["sampler_name"] == "DPM++ 2M SDE Karras"
    assert payload["scheduler"] is None
    assert candidate.settings.sampler == "DPM++ 2M SDE Karras"
    assert candidate.settings.seed == 42 and candidate.image.size == (64, 96)


@pytest.mark.parametrize(
    "sampler, scheduler, new, old",
    [
        ("DPM++ 2M SDE Karras", "", ("DPM++ 2M SDE", "karras"), "DPM++ 2M SDE Karras"),
        ("DPM++ 2M SDE", "Karras", ("DPM++ 2M SDE", "karras"), "DPM++ 2M SDE Karras"),
        ("DPM++ 2M SDE", "karras", ("DPM++ 2M SDE", "karras"), "DPM++ 2M SDE Karras"),
        ("Euler a", "", ("Euler a", "automatic"), "Euler a"),
        ("DPM++ 2M SDE", "", ("DPM++ 2M SDE", "automatic"), "DPM++ 2M SDE"),
    ],
)
def test_sampler_names_per_server_version(sampler, scheduler, new, old):
    samplers = [{"name": n, "aliases": []} for n in NEW_SAMPLERS]
    schedulers = [{"name": n, "label": label} for n, label in SCHEDULERS]
    wire = choose_sampler(sampler, scheduler, samplers, schedulers)
    assert (wire.sampler_name, wire.scheduler) == new
    old_samplers = [{"name": n} for n in OLD_SAMPLERS]
    wire = choose_sampler(sampler, scheduler, old_samplers, None)
    assert (wire.sampler_name, wire.scheduler) == (old, None)


# --- the pool ------------------------------------------------------------------------


def test_a_stalled_job_is_interrupted_and_moved(servers):
    first, second, _ = servers
    first.faults.append("hang")
    gen = generator([first, second])
    try:
        started = time.perf_counter()
        results = gen.generate(specs(2), [1, 2])
        elapsed = time.perf_counter() - started
        assert all(not isinstance(r, ItemFailed) for r in results)
        assert first.interrupts == 1
        assert [r["fault"] for r in first.requests][0] == "hang"
        assert elapsed < 3
        assert gen.usage()["stalls"] == 1
        # the interrupted server answers again and is taken back
        deadline = time.monotonic() + 5
        while gen.usage()["servers_up"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gen.usage()["servers_up"] == 2
    finally:
        gen.close()


def test_a_server_that_comes_back_is_used_again(servers):
    first, second, _ = servers
    gen = generator([first, second])
    try:
        gen.generate(specs(2), [1, 2])
        second.kill()
        results = gen.generate(specs(4, start=2), [3, 4, 5, 6])
        assert all(not isinstance(r, ItemFailed) for r in results)
        before = second.images_made()

        second.start()  # same port
        deadline = time.monotonic() + 5
        while gen.usage()["servers_up"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        results = gen.generate(specs(4, start=6), [7, 8, 9, 10])
        assert all(not isinstance(r, ItemFailed) for r in results)
        assert second.images_made() > before
        assert gen.usage()["revivals"] == 1
    finally:
        gen.close()


def test_every_server_down_stops_the_run_resumably(servers):
    first = servers[0]
    gen = generator([first], wait_for_server=0.3)
    try:
        gen.generate(specs(1), [1])
        first.kill()
        with pytest.raises(ServersDown, match="run the same command again"):
            gen.generate(specs(2, start=1), [2, 3])
    finally:
        gen.close()


def test_no_server_answering_at_start_is_a_config_error(servers):
    first = servers[0]
    first.kill()
    gen = generator([first])
    with pytest.raises(ConfigError, match="no server answered"):
        gen.generate(specs(1), [1])
    gen.close()


def test_the_checkpoint_is_selected_and_confirmed(servers):
    first = servers[0]
    gen = generator([first], model="v1-5-pruned-emaonly.safetensors")
    try:
        [candidate] = gen.generate(specs(1), [5])
    finally:
        gen.close()
    title = "v1-5-pruned-emaonly.safetensors [6ce0161689]"
    assert first.options["sd_model_checkpoint"] == title
    assert candidate.settings.model == title
    payload = first.requests[0]["payload"]
    assert payload["override_settings"]["sd_model_checkpoint"] == title

    second = servers[1]
    second.ignore_model = True
    gen = generator([second], model="v1-5-pruned-emaonly")
    with pytest.raises(ConfigError, match="reports 'majicmixRealistic_v6"):
        gen.generate(specs(1), [5])
    gen.close()
    assert not second.requests


def test_different_checkpoints_without_a_model_option_are_refused(servers):
    servers[1].options["sd_model_checkpoint"] = servers[1].models[1]["title"]
    gen = generator(servers[:2])
    with pytest.raises(ConfigError, match="different checkpoints loaded"):
        gen.generate(specs(1), [1])
    gen.close()


def test_a_run_of_the_pool_is_parallel(servers):
    for server in servers:
        server.delay = 0.2
    gen = generator(servers)
    try:
        gen.generate(specs(3), [1, 2, 3])  # set-up
        started = time.perf_counter()
        results = gen.generate(specs(3, start=3), [4, 5, 6])
        elapsed = time.perf_counter() - started
    finally:
        gen.close()
    assert len(results) == 3 and elapsed < 0.5  # three at once, not 0.6 s in a row
    assert gen.batch_size == 9  # three jobs a server in each batch


# --- options -------------------------------------------------------------------------


def test_servers_are_required_and_loopback_only_under_tests():
    with pytest.raises(ConfigError, match="set generator.servers"):
        WebUIGenerator(WebUIOptions(), Context(None))
    options = WebUIOptions(servers=["http://192.0.2.7:7860/sdapi/v1/"])
    assert options.servers == ["http://192.0.2.7:7860"]
    with pytest.raises(ConfigError, match="refusing to call 192.0.2.7"):
        WebUIGenerator(options, Context(None))
    with pytest.raises(ValueError, match="listed twice"):
        WebUIOptions(servers=["http://127.0.0.1:1", "http://127.0.0.1:1/"])


def test_without_webuiapi_the_error_names_the_extra(monkeypatch, servers):
    monkeypatch.setitem(__import__("sys").modules, "webuiapi", None)
    webui._client_class.cache_clear()
    gen = generator(servers[:1])
    try:
        with pytest.raises(MissingDependency, match=r"chatroom\[webui\]"):
            gen.generate(specs(1), [1])
    finally:
        gen.close()
        webui._client_class.cache_clear()
