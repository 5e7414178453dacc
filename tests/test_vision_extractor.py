"""The vision extractor against a fake OpenAI / Anthropic vision model on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import pytest
from fakes.llm_server import FakeLLMServer, describe_photo
from PIL import Image

from chatroom.errors import ConfigError, QuotaExhausted
from chatroom.plugins import remote
from chatroom.plugins.vision_extractor import prepare_picture

PROVIDERS = ("openai", "anthropic")
KEY_ENV = "CHATROOM_TEST_VLM_KEY"


@pytest.fixture
def llm(monkeypatch):
    """A fake vision model, and its key in the environment."""
    with FakeLLMServer() as server:
        monkeypatch.setenv(KEY_ENV, server.key)
        yield server


def overrides(llm, provider="openai", **options):
    options = {
        "use": "vision",
        "provider": provider,
        "base_url": llm.base_url(provider),
        "api_key_env": KEY_ENV,
        "retry_wait": 0.01,
        **options,
    }
    return settings("extractor", options)


def settings(prefix, options):
    """``--set`` overrides; a table becomes one override per key."""
    out = []
    for key, value in options.items():
        if isinstance(value, dict):
            out += settings(f"{prefix}.{key}", value)
        else:
            out.append(f"{prefix}.{key}={json.dumps(value)}")
    return out


def rows(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def bank_by_reference(out):
    bank: dict[str, dict[str, dict]] = {}
    for row in rows(out / "attributes.jsonl"):
        bank.setdefault(row["reference"], {})[row["attribute"]] = row
    return bank


def extractor_info(out):
    run = json.loads((out / "run.json").read_text())
    return run, run["components"]["extractor:extractor"]


def assert_no_key(out, key, *texts):
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
    for text in texts:
        assert key not in text


def sent_sha256(request):
    return hashlib.sha256(base64.b64decode(request["images"][0]["data"])).hexdigest()


# --- a fashion run on the shared photos --------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_shared_photos_give_a_bank_of_the_models_answers(
    chatroom_run, fashion_refs, llm, provider
):
    summary, out = chatroom_run(
        fashion_refs, stop_after="attributes", overrides=overrides(llm, provider)
    )

    assert summary.status == "stopped after attributes"
    run, info = extractor_info(out)
    references = {r["sha256"]: r["id"] for r in run["references"]["images"]}
    assert len(references) == 17

    # The key-attributes answer added three attributes; every photo was then asked
    # all ten questions in one request, and the bank holds exactly what was answered.
    discovery, *asked = llm.requests
    assert discovery["answers"] == llm.key_attributes
    bank = bank_by_reference(out)
    assert sorted(bank) == sorted(references.values())
    assert len(asked) == 17
    for request in asked:
        assert request["provider"] == provider
        assert request["images"][0]["media_type"] in ("image/jpeg", "image/png")
        reference = references[sent_sha256(request)]  # photos within limits go as is
        answers = request["answers"]
        assert set(answers) == {
            "garment",
            "color",
            "pattern",
            "footwear",
            "accessory",
            "pose",
            "background",
            "fabric",
            "fit",
            "silhouette",
        }
        got = {name: row["value"] for name, row in bank[reference].items()}
        assert got == answers
        assert all(row["extractor"] == "vision" for row in bank[reference].values())
        assert bank[reference]["fit"]["question"] == "What is the fit of the person?"

    usage = info["usage"]
    assert usage["calls"] == 18 and usage["references_answered_by"] == {"vision": 17}
    assert usage["prompt_tokens"] > 17 * 500  # the pictures are most of it
    price_in, price_out = remote.PRICES[info["model"]]
    expected = (
        usage["prompt_tokens"] * price_in + usage["completion_tokens"] * price_out
    ) / 1e6
    assert usage["cost_usd"] == pytest.approx(expected, abs=1e-6)
    assert info["provider"] == provider
    assert_no_key(out, llm.key)


# --- pictures ----------------------------------------------------------------------


def photo(fashion_refs, size=(300, 400)) -> Image.Image:
    with Image.open(sorted(fashion_refs.glob("*.jpg"))[0]) as img:
        return img.convert("RGB").resize(size)


def odd_pictures(folder, fashion_refs):
    """A references folder of pictures no API takes as they are, and one it does."""
    folder.mkdir()
    base = photo(fashion_refs)
    base.save(folder / "a_webp.webp", "WEBP")
    base.convert("CMYK").save(folder / "b_cmyk.jpg", "JPEG")
    base.save(folder / "c_tiff.tif", "TIFF")
    base.save(folder / "d_bmp.bmp", "BMP")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "e_palette.png")
    grey16 = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "f_grey16.png")
    # Coarse noise: it stays noise when shrunk, so JPEG cannot make it small.
    noise = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    huge = Image.fromarray(noise).resize((2400, 1600), Image.Resampling.NEAREST)
    huge.save(folder / "g_huge.png", compress_level=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: upright it is 400 wide and 300 high
    base.save(folder / "h_rotated.jpg", "JPEG", exif=exif)
    base.save(folder / "i_jpeg_named.png", "JPEG", quality=80)  # the name lies
    return folder


def test_pictures_are_converted_and_capped_before_they_are_sent(
    chatroom_run, fashion_refs, llm, tmp_path
):
    folder = odd_pictures(tmp_path / "odd", fashion_refs)
    llm.max_image_side, llm.max_image_bytes = 512, 60_000  # the fake enforces both
    options = {"max_side": 512, "max_bytes": 60_000, "discover": 0, "concurrency": 1}
    summary, out = chatroom_run(
        folder, stop_after="attributes", overrides=overrides(llm, **options)
    )

    files = sorted(p.name for p in folder.iterdir())
    assert len(llm.requests) == len(files)  # one each, in order: none refused
    received = {
        name: request["images"][0]
        for name, request in zip(files, llm.requests, strict=True)
    }
    for name, image in received.items():
        assert image["format"] in ("JPEG", "PNG"), name
        assert image["media_type"] == f"image/{image['format'].lower()}", name
        assert max(image["width"], image["height"]) <= 512, name
        assert image["bytes"] <= 60_000, name
        assert image["mode"] in ("RGB", "L"), name
    for name in files[:7]:  # WebP, CMYK, TIFF, BMP, palette, 16-bit, huge: JPEG
        assert received[name]["format"] == "JPEG" and received[name]["mode"] == "RGB"
    huge = received["g_huge.png"]  # 2400x1600 of noise: below 512 to fit the bytes
    assert huge["width"] < 512
    assert huge["width"] / huge["height"] == pytest.approx(1.5, abs=0.02)
    rotated = received["h_rotated.jpg"]  # turned upright, as EXIF says
    assert (rotated["width"], rotated["height"]) == (400, 300)
    lying = received["i_jpeg_named.png"]  # sniffed as the JPEG it is, sent as is
    assert lying["media_type"] == "image/jpeg"
    assert base64.b64decode(lying["data"]) == (folder / "i_jpeg_named.png").read_bytes()
    assert sorted(bank_by_reference(out)) == sorted(p.split(".")[0] for p in files)


@pytest.mark.parametrize(
    ("mode", "kind"), [("RGB", "WEBP"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("P", "PNG")]
)
def test_prepare_picture_sends_rgb_jpeg_for_what_apis_may_not_take(
    tmp_path, fashion_refs, mode, kind
):
    image = photo(fashion_refs)
    if mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16)
        image = Image.fromarray(grey * 257)
    else:
        image = image.convert(mode)
    path = tmp_path / "picture.bin"  # no suffix to go by
    image.save(path, kind)

    picture = prepare_picture(path, max_side=200, max_bytes=30_000)

    assert picture.converted and picture.media_type == "image/jpeg"
    assert (picture.width, picture.height) == (150, 200)
    assert len(picture.data) <= 30_000
    with _open(picture.data) as sent:
        assert sent.format == "JPEG" and sent.mode == "RGB" and sent.size == (150, 200)
        if mode == "I;16":  # scaled to 8 bits, not clipped to white
            assert 30 < np.asarray(sent).mean() < 225


def _open(data: bytes) -> Image.Image:
    import io

    return Image.open(io.BytesIO(data))


# --- refusals and the fallback -----------------------------------------------------


def same_picture(path):
    with Image.open(path) as img:
        target = img.convert("RGB").tobytes()
    return lambda image: image.convert("RGB").tobytes() == target


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_refused_photo_is_recorded_and_the_fallback_answers_it(
    chatroom_run, few_refs, llm, provider
):
    refused = sorted(few_refs.iterdir())[1]
    llm.refuse_image = same_picture(refused)
    static = {"values": {"garment": ["grey hoodie"], "color": ["grey"]}}
    options = {"discover": 0, "fallback": "static", "fallback_options": static}
    summary, out = chatroom_run(
        few_refs,
        count=2,
        stop_after="prompts",
        overrides=overrides(llm, provider, **options),
    )

    assert summary.status == "stopped after prompts"
    bank = bank_by_reference(out)
    assert {n: r["value"] for n, r in bank[refused.stem].items()} == {
        "garment": "grey hoodie",
        "color": "grey",
    }
    assert {r["extractor"] for r in bank[refused.stem].values()} == {"static"}
    for path in sorted(few_refs.iterdir()):
        if path != refused:
            assert len(bank[path.stem]) == 7
            assert {r["extractor"] for r in bank[path.stem].values()} == {"vision"}

    (failure,) = [f for f in rows(out / "failures.jsonl") if f["stage"] == "extractor"]
    assert failure["kind"] == "reference"
    assert failure["subject"] == str(refused.resolve())
    assert "the model refused: I'm sorry, but I can't help" in failure["reason"]
    assert "the fallback extractor 'static' answered" in failure["reason"]
    _, info = extractor_info(out)
    assert info["usage"]["refusals"] == 1 and info["usage"]["fallback_answered"] == 1
    assert info["usage"]["references_answered_by"] == {"vision": 2, "static": 1}
    assert info["fallback"]["component"] == "static"


def test_an_apology_without_a_fallback_leaves_the_photo_out(
    chatroom_run, few_refs, llm
):
    llm.faults.extend(["ok", "refusal_text"])  # the second photo, one at a time
    summary, out = chatroom_run(
        few_refs,
        count=2,
        stop_after="attributes",
        overrides=overrides(llm, "anthropic", discover=0, concurrency=1),
    )

    second = sorted(few_refs.iterdir())[1]
    bank = bank_by_reference(out)
    assert second.stem not in bank and len(bank) == 2
    (failure,) = [f for f in rows(out / "failures.jsonl") if f["stage"] == "extractor"]
    assert failure["subject"] == str(second.resolve())
    assert "I'm sorry, but I can't help with that request" in failure["reason"]
    assert "no fallback extractor" in failure["reason"]
    assert len(llm.requests) == 3  # a refusal is not asked again


def test_a_bad_answer_is_asked_again_and_a_good_one_kept(chatroom_run, few_refs, llm):
    asked: list[set[str]] = []

    def echo_the_pose_once(image, questions):
        asked.append(set(questions))
        answers = describe_photo(image, questions)
        if len(asked) == 1:
            answers["pose"] = "what pose is the person standing in"
            answers.pop("footwear")
        return answers

    llm.vision_answers = echo_the_pose_once
    options = {"discover": 0, "concurrency": 1}
    _, out = chatroom_run(
        few_refs, stop_after="attributes", overrides=overrides(llm, **options)
    )

    assert asked[1] == {"pose", "footwear"}  # only what was missing or bad
    first = bank_by_reference(out)[sorted(few_refs.iterdir())[0].stem]
    assert len(first) == 7 and "pose" not in first["pose"]["value"]
    _, info = extractor_info(out)
    assert info["usage"]["asked_again"] == 1 and info["usage"]["calls"] == 4


# --- the remote policy -------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rate_limits_and_server_errors_are_retried(
    chatroom_run, few_refs, llm, provider
):
    llm.faults.extend(["rate_limit", "server_error", "overloaded"])
    options = {"discover": 0, "concurrency": 1}
    _, out = chatroom_run(
        few_refs, stop_after="attributes", overrides=overrides(llm, provider, **options)
    )

    assert not llm.faults
    assert len(bank_by_reference(out)) == 3
    _, info = extractor_info(out)
    assert info["usage"]["retries"] == 3 and info["usage"]["calls"] == 6
    assert info["usage"]["retried_429"] == 1 and info["usage"]["retried_500"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_quota_stops_the_run_with_a_clear_message_and_it_resumes(
    chatroom_run, few_refs, llm, provider
):
    llm.always = "quota"
    with pytest.raises(QuotaExhausted) as stopped:
        chatroom_run(
            few_refs, stop_after="attributes", overrides=overrides(llm, provider)
        )

    message = str(stopped.value)
    assert message.startswith("extractor (vision): the service reports no quota")
    assert "run the same command again" in message
    out = few_refs.parent / "out"
    run, _ = extractor_info(out)
    assert run["status"] == "stopped" and not (out / "attributes.jsonl").exists()
    assert_no_key(out, llm.key, message)

    llm.always = None
    summary, out = chatroom_run(
        few_refs, stop_after="attributes", overrides=overrides(llm, provider)
    )
    assert summary.status == "stopped after attributes"
    assert len(bank_by_reference(out)) == 3


def test_a_quota_met_midway_stops_the_rest_and_the_rerun_pays_only_for_them(
    chatroom_run, few_refs, llm
):
    llm.faults.extend(["ok", "quota"])  # the second photo, one at a time
    options = {"discover": 0, "concurrency": 1}
    with pytest.raises(QuotaExhausted):
        chatroom_run(
            few_refs, stop_after="attributes", overrides=overrides(llm, **options)
        )
    assert len(llm.requests) == 2  # the third photo was not tried

    chatroom_run(few_refs, stop_after="attributes", overrides=overrides(llm, **options))
    assert len(llm.requests) == 4  # the first photo's answers came from the journal
    bank = bank_by_reference(few_refs.parent / "out")
    assert len(bank) == 3 and all(len(values) == 7 for values in bank.values())


def test_a_rejected_key_names_its_variable_and_not_the_key(
    chatroom_run, few_refs, llm, monkeypatch, caplog
):
    wrong = "sk-wrong-9876543210fedcba"
    monkeypatch.setenv(KEY_ENV, wrong)
    with pytest.raises(ConfigError) as error:
        chatroom_run(few_refs, stop_after="attributes", overrides=overrides(llm))

    assert f"rejected the API key in ${KEY_ENV} (401)" in str(error.value)
    assert_no_key(few_refs.parent / "out", wrong, str(error.value), caplog.text)


def test_public_hosts_are_refused_under_test(chatroom_run, few_refs, llm):
    with pytest.raises(ConfigError, match="refusing to call api.openai.com"):
        chatroom_run(
            few_refs,
            stop_after="attributes",
            overrides=overrides(llm, base_url="https://api.openai.com/v1"),
        )
    assert llm.requests == []


@pytest.mark.parametrize(
    ("fallback", "message"),
    [
        (
            "statik",
            "option 'fallback' = 'statik': unknown extractor 'statik' (did you mean 'static'?)",
        ),
        ("vision", "option 'fallback' = 'vision': name another extractor"),
    ],
)
def test_a_bad_fallback_is_a_config_error_before_any_request(
    chatroom_run, few_refs, llm, fallback, message
):
    with pytest.raises(ConfigError) as error:
        chatroom_run(
            few_refs,
            stop_after="attributes",
            overrides=overrides(llm, fallback=fallback),
        )
    assert message in str(error.value)
    assert llm.requests == []


def test_the_fallbacks_own_options_are_checked(chatroom_run, few_refs, llm):
    with pytest.raises(
        ConfigError, match=r"extractor \(static\): set extractor.values"
    ):
        chatroom_run(
            few_refs,
            stop_after="attributes",
            overrides=overrides(llm, fallback="static"),
        )
