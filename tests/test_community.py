"""Community prompts: WebUI images and JSONL in, few-shot rows, statistics, defaults."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fakes.llm_server import FakeLLMServer

from chatroom import community
from chatroom.errors import ConfigError

KEY_ENV = "CHATROOM_TEST_LLM_KEY"

# The WebUI's text, as it writes it: a quoted value holds commas, the prompt runs
# over two lines.
FULL = (
    "best quality, (photorealistic:1.4), 1woman, (red wool coat:1.2), "
    "<lora:detail_tweaker:0.6>\n"
    "((full body)), city street\n"
    "Negative prompt: (worst quality:2), lowres, bad hands\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
    "Seed: 123, Size: 512x768, Model hash: 7c819b6d13, Model: majicmixRealistic_v6, "
    'Clip skip: 2, Lora hashes: "detail_tweaker: e3b0c4, other: 12ab", '
    "Denoising strength: 0.4, Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+, "
    "Hires steps: 15, Version: v1.9.4"
)
NO_NEGATIVE = (
    "masterpiece, 1girl, denim jacket, (full body:1.3)\n"
    "Steps: 25, Sampler: Euler a, CFG scale: 5.5, Seed: 9, Size: 512x768, "
    "Model: cyberrealistic_v33"
)
# An older WebUI: the scheduler in the sampler's name, hires steps left at 0.
OLD_STYLE = (
    "photo of a man, grey suit\n"
    "Negative prompt: cartoon\n"
    "Steps: 20, Sampler: DPM++ SDE Karras, CFG scale: 8, Seed: 5, Size: 768x512, "
    "Model: realisticVision, Denoising strength: 0.5, Hires upscale: 1.5, "
    "Hires upscaler: Latent"
)


def cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "chatroom.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def png(path: Path, parameters: str | None, international: bool = False) -> Path:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None and international:
        info.add_itxt("parameters", parameters, zip=True)  # an iTXt chunk
    elif parameters is not None:
        info.add_text("parameters", parameters)  # a tEXt chunk
    Image.new("RGB", (8, 8), "white").save(path, pnginfo=info)
    return path


def exif_image(path: Path, parameters: str, fmt: str = "JPEG") -> Path:
    """A JPEG or WebP with the text in EXIF UserComment, as the WebUI (piexif) saves."""
    from PIL import Image

    exif = Image.Exif()
    exif.get_ifd(community.EXIF_IFD)[community.USER_COMMENT] = (
        b"UNICODE\x00" + parameters.encode("utf-16-be")
    )
    Image.new("RGB", (8, 8), "white").save(path, format=fmt, exif=exif)
    return path


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the parameters text -------------------------------------------------------------


def test_parameters_text_is_split_and_quoted_values_keep_their_commas():
    parsed = community.parse_parameters(FULL)
    assert parsed["prompt"].endswith("((full body)), city street")
    assert parsed["prompt"].count("\n") == 1
    assert parsed["negative_prompt"] == "(worst quality:2), lowres, bad hands"
    params = parsed["params"]
    assert params["Lora hashes"] == "detail_tweaker: e3b0c4, other: 12ab"
    assert params["Schedule type"] == "Karras" and params["Version"] == "v1.9.4"
    assert params["Hires upscaler"] == "R-ESRGAN 4x+"

    row = community.normalise({"parameters": FULL})
    assert row["family"] == "sd15" and row["id"].startswith("sd15-")
    assert row["settings"] == {
        "sampler": "DPM++ 2M Karras",
        "scheduler": "Karras",
        "steps": 30,
        "cfg_scale": 7.0,
        "seed": 123,
        "width": 512,
        "height": 768,
        "clip_skip": 2,
        "model": "majicmixRealistic_v6",
        "model_hash": "7c819b6d13",
        "hires": {
            "enabled": True,
            "upscaler": "R-ESRGAN 4x+",
            "scale": 2.0,
            "denoise": 0.4,
            "steps": 15,
        },
    }


def test_a_missing_negative_prompt_and_the_webui_defaults_it_leaves_out():
    row = community.normalise({"parameters": NO_NEGATIVE})
    assert row["prompt"] == "masterpiece, 1girl, denim jacket, (full body:1.3)"
    assert row["negative_prompt"] == ""
    # The WebUI writes no "Clip skip" at 1 and no hires keys when it is off.
    assert row["settings"]["clip_skip"] == 1
    assert row["settings"]["hires"] == {"enabled": False}
    assert row["settings"]["scheduler"] == "Automatic"


def test_an_older_sampler_name_carries_its_scheduler_and_hires_steps_default():
    settings = community.normalise({"parameters": OLD_STYLE})["settings"]
    assert settings["sampler"] == "DPM++ SDE Karras"
    assert settings["scheduler"] == "Karras"
    assert settings["hires"] == {
        "enabled": True,
        "upscaler": "Latent",
        "scale": 1.5,
        "denoise": 0.5,
        "steps": 20,  # the WebUI's 0: as many as the first pass
    }


def test_webui_api_payload_names_are_read():
    payload = {
        "prompt": "a coat",
        "sampler_name": "Euler a",
        "enable_hr": False,
        "hr_scale": 2,
        "denoising_strength": 0.7,
    }
    settings = community.normalise(payload)["settings"]
    assert settings == {
        "sampler": "Euler a",
        "scheduler": "Automatic",
        "hires": {"enabled": False},
    }
    payload["enable_hr"] = True
    hires = community.normalise(payload)["settings"]["hires"]
    assert hires == {"enabled": True, "scale": 2.0, "denoise": 0.7}


def test_a_scheduler_the_sampler_name_cannot_carry_is_named_in_the_defaults():
    text = FULL.replace("Schedule type: Karras", "Schedule type: SGM Uniform")
    row = community.normalise({"parameters": text})
    assert row["settings"]["sampler"] == "DPM++ 2M"
    toml_text = community.defaults_toml([row])
    assert "# Most used scheduler: SGM Uniform (1 of 1)" in toml_text
    assert tomllib.loads(toml_text)["generator"]["sampler"] == "DPM++ 2M"


def test_the_family_is_guessed_from_the_model_and_the_size():
    sdxl = FULL.replace("Size: 512x768", "Size: 832x1216")
    assert community.normalise({"parameters": sdxl})["family"] == "sdxl"
    named = FULL.replace("majicmixRealistic_v6", "juggernautXL_v9")
    assert community.normalise({"parameters": named})["family"] == "sdxl"
    assert community.normalise({"parameters": sdxl}, "sd15")["family"] == "sd15"


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "(red coat:1.2), [blurry], ((full body))",
            ["red coat", "blurry", "full body"],
        ),
        ("a, b BREAK c,\nd", ["a", "b", "c", "d"]),
        ("Photo, <lora:add_detail:0.5> sharp  focus", ["photo", "sharp focus"]),
        (r"\(cosplay\), x", ["(cosplay)", "x"]),
    ],
)
def test_terms_drop_weights_and_split_at_commas(text, expected):
    assert community.terms(text)[0] == expected


# --- import --------------------------------------------------------------------------


def test_import_reads_images_and_jsonl_and_says_why_it_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    png(src / "a_full.png", FULL)
    png(src / "b_no_negative.png", NO_NEGATIVE)
    png(src / "c_old.png", OLD_STYLE.replace("grey suit", "café suit"), True)
    png(src / "d_plain.png", None)
    png(src / "e_copy.png", FULL)
    exif_image(src / "f_exif.jpg", OLD_STYLE.replace("grey suit", "navy suit"))
    exif_image(src / "g_exif.webp", NO_NEGATIVE.replace("denim", "leather"), "WEBP")
    (src / "h_broken.png").write_bytes(b"not a png")
    samples = tmp_path / "civitai.jsonl"
    samples.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "prompt": "raw photo, linen shirt",
                        "negative_prompt": "anime",
                        "steps": 28,
                        "sampler": "DPM++ 2M Karras",
                        "cfg_scale": 6,
                        "width": 1024,
                        "height": 1024,
                        "seed": 1,
                        "model": "someModel",
                    }
                ),
                json.dumps(
                    {
                        "meta": {
                            "prompt": "studio photo, silk dress",
                            "negativePrompt": "cartoon",
                            "cfgScale": 7,
                            "Size": "512x768",
                            "Clip skip": 2,
                            "Hires upscale": 2,
                        }
                    }
                ),
                json.dumps({"parameters": NO_NEGATIVE.replace("1girl", "1boy")}),
                json.dumps({"negative_prompt": "only a negative"}),
                "{not json",
                "",
            ]
        )
    )
    out = tmp_path / "rows.jsonl"

    result = cli("prompts", "import", "src", "civitai.jsonl", "-o", out, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "wrote 8 samples" in result.stdout and "(5 skipped)" in result.stdout
    skipped = result.stderr
    assert "d_plain.png: no generation parameters" in skipped
    assert "e_copy.png: duplicate of src/a_full.png" in skipped
    assert "h_broken.png: not a readable image" in skipped
    assert "civitai.jsonl:4: no prompt" in skipped
    assert "civitai.jsonl:5: not JSON" in skipped

    rows = rows_of(out)
    by_source = {row["source"]: row for row in rows}
    assert set(rows[0]) == {
        "id",
        "prompt",
        "negative_prompt",
        "family",
        "settings",
        "params",
        "source",
    }
    assert len({row["id"] for row in rows}) == 8
    assert by_source["src/c_old.png"]["prompt"] == "photo of a man, café suit"
    jpeg = by_source["src/f_exif.jpg"]
    assert jpeg["prompt"] == "photo of a man, navy suit"
    assert jpeg["settings"]["sampler"] == "DPM++ SDE Karras"
    webp = by_source["src/g_exif.webp"]
    assert webp["prompt"].startswith("masterpiece, 1girl, leather jacket")
    plain = by_source["civitai.jsonl:1"]
    assert plain["family"] == "sdxl"  # 1024x1024
    assert plain["settings"] == {
        "sampler": "DPM++ 2M Karras",
        "scheduler": "Karras",
        "steps": 28,
        "cfg_scale": 6.0,
        "seed": 1,
        "width": 1024,
        "height": 1024,
        "model": "someModel",
    }
    civitai = by_source["civitai.jsonl:2"]
    assert civitai["negative_prompt"] == "cartoon"
    assert civitai["settings"]["clip_skip"] == 2
    assert civitai["settings"]["hires"] == {"enabled": True, "scale": 2.0}
    assert by_source["civitai.jsonl:3"]["prompt"].startswith("masterpiece, 1boy")

    # The rows are few-shot examples, and a second import of them changes nothing.
    from chatroom.domain import FewShot

    assert FewShot.model_validate(rows[0]).prompt == rows[0]["prompt"]
    again = tmp_path / "again.jsonl"
    assert cli("prompts", "import", out, "-o", again, cwd=tmp_path).returncode == 0
    assert [r["id"] for r in rows_of(again)] == [r["id"] for r in rows]
    assert [r["settings"] for r in rows_of(again)] == [r["settings"] for r in rows]


def test_import_never_overwrites_without_being_asked(tmp_path):
    source = png(tmp_path / "a.png", "red coat\nSteps: 20, Sampler: Euler a, Seed: 1")
    (tmp_path / "old.jsonl").write_text("precious\n")

    into_source = cli("prompts", "import", "a.png", "-o", "a.png", cwd=tmp_path)
    existing = cli("prompts", "import", "a.png", "-o", "old.jsonl", cwd=tmp_path)
    replaced = cli(
        "prompts", "import", "a.png", "-o", "old.jsonl", "--overwrite", cwd=tmp_path
    )

    assert into_source.returncode == 2 and "is one of the sources" in into_source.stderr
    assert existing.returncode == 2 and "--overwrite" in existing.stderr
    assert source.read_bytes().startswith(b"\x89PNG")
    assert replaced.returncode == 0
    assert rows_of(tmp_path / "old.jsonl")[0]["prompt"] == "red coat"


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "x", "settings": "flat"}', "'settings' must be a table"),
        ('{"prompt": "x", "settings": {"steps": "abc"}}', "settings.steps = 'abc'"),
        ('{"prompt": null, "settings": {"steps": 20}}', "'prompt' must be text"),
        ('{"prompt": "x", "settings": {"cfg_scale": 1e999}}', "finite"),
    ],
)
def test_hand_edited_rows_are_one_line_errors(tmp_path, row, message):
    (tmp_path / "edited.jsonl").write_text(row + "\n")
    for command in ("stats", "defaults"):
        result = cli("prompts", command, "edited.jsonl", cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_a_missing_source_is_one_line_and_exit_2(tmp_path):
    result = cli("prompts", "import", "nowhere", "-o", "x.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: nowhere: no such file or folder"


# --- statistics and defaults ---------------------------------------------------------


def sample(prompt, negative, sampler, steps, cfg, size, clip_skip, hires=None):
    width, height = size
    settings = {
        "sampler": sampler,
        "scheduler": "Karras" if sampler.endswith("Karras") else "Automatic",
        "steps": steps,
        "cfg_scale": cfg,
        "width": width,
        "height": height,
        "clip_skip": clip_skip,
        "hires": hires or {"enabled": False},
    }
    return community.normalise(
        {"prompt": prompt, "negative_prompt": negative, "settings": settings}, "sd15"
    )


HIRES = {
    "enabled": True,
    "upscaler": "R-ESRGAN 4x+",
    "scale": 2,
    "denoise": 0.4,
    "steps": 15,
}
KNOWN = [
    sample(
        "best quality, (red coat:1.2), full body",
        "(worst quality:2), lowres",
        "DPM++ 2M Karras",
        20,
        5,
        (512, 768),
        2,
        HIRES,
    ),
    sample(
        "best quality, blue dress",
        "lowres, bad hands",
        "DPM++ 2M Karras",
        25,
        7,
        (512, 768),
        2,
        HIRES,
    ),
    sample(
        "masterpiece, best quality, ((full body))",
        "lowres",
        "Euler a",
        30,
        7,
        (512, 768),
        1,
        {**HIRES, "denoise": 0.5},
    ),
    sample(
        "best quality, best quality, green shirt",
        "",
        "DPM++ 2M Karras",
        30,
        7,
        (768, 512),
        2,
    ),
    sample(
        "raw photo, full body",
        "(lowres:1.5), bad hands",
        "DPM++ SDE Karras",
        40,
        8,
        (512, 768),
        2,
        {**HIRES, "upscaler": "Latent", "scale": 1.5},
    ),
]


@pytest.fixture
def known(tmp_path):
    path = tmp_path / "known.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in KNOWN))
    return path


def test_statistics_of_a_known_set_are_exact(known, tmp_path):
    result = cli("prompts", "stats", known.name, "--json", "--top", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    assert report["rows"] == 5
    assert report["samplers"] == [
        {"value": "DPM++ 2M Karras", "count": 3},
        {"value": "Euler a", "count": 1},
        {"value": "DPM++ SDE Karras", "count": 1},
    ]
    assert report["schedulers"] == [
        {"value": "Karras", "count": 4},
        {"value": "Automatic", "count": 1},
    ]
    # steps 20 25 30 30 40: quartiles by linear interpolation.
    assert report["steps"] == {
        "n": 5,
        "min": 20,
        "q1": 25,
        "median": 30,
        "q3": 30,
        "iqr": 5,
        "max": 40,
    }
    assert report["cfg_scale"]["median"] == 7.0 and report["cfg_scale"]["iqr"] == 0
    assert report["cfg_scale_values"][0] == {"value": 7.0, "count": 3}
    assert report["sizes"] == [
        {"value": "512x768", "count": 4},
        {"value": "768x512", "count": 1},
    ]
    assert report["clip_skip"] == [
        {"value": 2, "count": 4},
        {"value": 1, "count": 1},
    ]
    hires = report["hires"]
    assert (hires["known"], hires["used"]) == (5, 4)
    assert hires["upscalers"] == [
        {"value": "R-ESRGAN 4x+", "count": 3},
        {"value": "Latent", "count": 1},
    ]
    assert hires["denoise"]["median"] == 0.4
    # A term counts once per prompt: "best quality" twice in one prompt counts 1.
    assert report["positive_terms"] == [
        {"value": "best quality", "count": 4},
        {"value": "full body", "count": 3},
        {"value": "red coat", "count": 1},
    ]
    assert report["negative_terms"][:2] == [
        {"value": "lowres", "count": 4},
        {"value": "bad hands", "count": 2},
    ]

    text = cli("prompts", "stats", known.name, cwd=tmp_path)
    assert text.returncode == 0
    assert "median 30, IQR 25-30 (5)" in text.stdout
    assert "DPM++ 2M Karras (3)" in text.stdout


def test_defaults_are_the_modal_values_as_a_generator_table(known, tmp_path):
    result = cli("prompts", "defaults", known.name, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = tomllib.loads(result.stdout)

    assert config == {
        "generator": {
            "sampler": "DPM++ 2M Karras",
            "steps": 30,
            "cfg_scale": 7.0,
            "width": 512,
            "height": 768,
            "clip_skip": 2,
            "hires": {
                "enabled": True,
                "upscaler": "R-ESRGAN 4x+",
                "scale": 2.0,
                "denoise": 0.4,
                "steps": 15,
            },
        }
    }
    # It pastes into a config: both generators accept it as it is.
    from chatroom.components import validate_options
    from chatroom.plugins.diffusers_generator import DiffusersGenerator
    from chatroom.plugins.webui_generator import WebUIGenerator

    for generator in (DiffusersGenerator, WebUIGenerator):
        validate_options(generator, "generator", config["generator"])


def test_defaults_of_rows_without_settings_is_an_error(tmp_path):
    path = tmp_path / "bare.jsonl"
    path.write_text(json.dumps({"prompt": "a coat"}) + "\n")
    result = cli("prompts", "defaults", path.name, cwd=tmp_path)
    assert result.returncode == 2
    assert "no generation settings" in result.stderr


# --- the LLM prompter, few-shot on the file ------------------------------------------


@pytest.fixture
def llm(monkeypatch):
    with FakeLLMServer() as server:
        monkeypatch.setenv(KEY_ENV, server.key)
        yield server


def prompter(**options):
    from chatroom.components import Context, validate_options
    from chatroom.domain import load_pack
    from chatroom.domains import fashion
    from chatroom.plugins.llm_prompter import LLMPrompter

    options = {"api_key_env": KEY_ENV, "retry_wait": 0.01, **options}
    parsed = validate_options(LLMPrompter, "prompter", options)
    domain = load_pack(Path(fashion.__file__).parent)
    return LLMPrompter(parsed, Context(domain)), domain


def plan(count):
    from chatroom.models import BankEntry, PlanItem

    return [
        PlanItem(
            index=i,
            item_id=f"item{i}",
            seed=i,
            entries=[BankEntry(attribute="garment", value=f"coat {i}", reference="r")],
        )
        for i in range(count)
    ]


def test_the_llm_prompter_sends_the_file_examples(known, llm, monkeypatch):
    from chatroom.plugins import llm_prompter

    sent = []
    complete = llm_prompter.OpenAIChat.complete

    def recording(self, system, user):
        sent.append(system)
        return complete(self, system, user)

    monkeypatch.setattr(llm_prompter.OpenAIChat, "complete", recording)
    writer, domain = prompter(
        base_url=llm.base_url("openai"), fewshot_file=str(known), max_fewshot=4
    )

    specs = writer.write(plan(3), domain)

    assert llm.calls() == 1 and len(sent) == 1
    for row in KNOWN[:4]:
        assert f"- {row['prompt']}" in sent[0]
    assert KNOWN[4]["prompt"] not in sent[0]  # beyond max_fewshot
    assert not any(shot.prompt in sent[0] for shot in domain.fewshot)
    ids = [row["id"] for row in KNOWN[:4]]
    assert all(spec.fewshot_ids == ids for spec in specs)
    assert writer.describe()["fewshot_ids"] == ids


def test_a_fewshot_file_without_the_family_is_a_config_error(known, llm):
    writer, domain = prompter(
        base_url=llm.base_url("openai"), fewshot_file=str(known), family="sdxl"
    )
    with pytest.raises(ConfigError, match=r"no sdxl prompts \(it holds: sd15 x5\)"):
        writer.write(plan(1), domain)
    missing, _ = prompter(base_url=llm.base_url("openai"), fewshot_file="nope.jsonl")
    with pytest.raises(ConfigError, match="fewshot_file nope.jsonl: no such file"):
        missing.write(plan(1), domain)
    assert llm.calls() == 0


def test_a_run_takes_the_fewshot_file_as_a_setting(chatroom_run, few_refs, known, llm):
    options = {
        "use": "llm",
        "base_url": llm.base_url("openai"),
        "api_key_env": KEY_ENV,
        "fewshot_file": str(known),
    }
    summary, out = chatroom_run(
        few_refs,
        count=3,
        overrides=[f"prompter.{k}={json.dumps(v)}" for k, v in options.items()],
        stop_after="prompts",
    )
    assert summary.status == "stopped after prompts"
    specs = [
        json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()
    ]
    assert len(specs) == 3
    assert all(s["fewshot_ids"] == [r["id"] for r in KNOWN] for s in specs)
