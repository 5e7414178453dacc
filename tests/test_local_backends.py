"""The local backends (diffusers generator, BLIP-2 extractor and captions) on tiny
random-weight models, and the logic around BLIP-2 with a scripted fake that answers
in real English."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from chatroom.components import Context, validate_options  # noqa: E402
from chatroom.domain import Domain  # noqa: E402
from chatroom.errors import ConfigError, MissingDependency  # noqa: E402
from chatroom.models import Candidate, PromptSpec, Reference  # noqa: E402
from chatroom.plugins import blip2, diffusers_generator  # noqa: E402
from chatroom.plugins.blip2 import (  # noqa: E402
    Blip2Asker,
    Blip2Captions,
    Blip2Extractor,
    answer_problem,
    clean_answer,
    parse_attributes,
)
from chatroom.plugins.diffusers_generator import (  # noqa: E402
    SAMPLERS,
    DiffusersGenerator,
    encode_chunks,
    encode_prompts,
    hires_size,
    make_scheduler,
    vocabulary,
)
from chatroom.plugins.prompt_weighting import tokenize_prompt  # noqa: E402
from chatroom.smoke import ESRGAN_FILE  # noqa: E402


@pytest.fixture(scope="session")
def domain():
    return Domain(
        name="fashion",
        word="fashion",
        subject="person",
        key_attributes_question="What are the key attributes of {word}?",
        attributes=[
            {"name": "garment", "question": "What clothes is the person wearing?"},
            {"name": "color", "question": "What color are the person's clothes?"},
        ],
        caption_questions=[
            "Describe the person's outfit in detail.",
            "What is the person wearing?",
            "What does the person in the picture look like?",
        ],
        prompt_template="${garment}",
        negative_prompt="lowres",
    )


# --- the diffusers generator -----------------------------------------------------


def make_generator(smoke_dir, **overrides):
    raw = {
        "model": str(smoke_dir / "sd15"),
        "steps": 2,
        "cfg_scale": 4.0,
        "width": 64,
        "height": 96,
        "clip_skip": 2,
        "device": "cpu",
        "dtype": "float32",
    }
    raw.update(overrides)
    options = validate_options(DiffusersGenerator, "generator", raw)
    return DiffusersGenerator(options, Context(domain=None))


def spec(index, prompt="a photo of a woman in a red dress", negative="lowres"):
    return PromptSpec(
        index=index, item_id=f"item-{index}", prompt=prompt, negative_prompt=negative
    )


def pixels(candidate):
    return np.asarray(candidate.image).astype(np.int16)


@pytest.fixture(scope="module")
def generator(smoke_dir):
    gen = make_generator(smoke_dir)
    yield gen
    gen.close()


def test_generates_images_of_the_configured_size(generator):
    (candidate,) = generator.generate([spec(3)], [42])
    assert candidate.image.size == (64, 96)
    assert candidate.index == 3 and candidate.item_id == "item-3"
    settings = candidate.settings
    assert settings.seed == 42
    assert (settings.width, settings.height, settings.steps) == (64, 96, 2)
    assert settings.sampler == "DPM++ 2M SDE Karras"
    assert settings.clip_skip == 2 and settings.cfg_scale == 4.0
    assert settings.model.endswith("sd15")
    assert candidate.timings["generate"] > 0
    assert candidate.received_prompt == "a photo of a woman in a red dress"
    assert candidate.warnings == []


def test_same_seed_same_pixels_other_seed_other_pixels(generator):
    first, again, other = generator.generate([spec(0), spec(1), spec(2)], [7, 7, 8])
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


LONG = "the " * 100 + "(coat:1.3)"  # 101 tokens of the tiny tokenizer: 2 chunks


def test_batch_equals_singles(smoke_dir, generator):
    # Items of different chunk counts run as separate groups, so neither is padded
    # to the other's length.
    batched = make_generator(smoke_dir, batch_size=3)
    trio = batched.generate([spec(0), spec(1, LONG), spec(2)], [11, 12, 13])
    singles = [
        generator.generate([spec(0)], [11])[0],
        generator.generate([spec(1, LONG)], [12])[0],
        generator.generate([spec(2)], [13])[0],
    ]
    pair = trio[:2]
    for together, alone in zip(trio, singles, strict=True):
        # Same noise per item; only CPU float rounding of batched kernels may move a
        # pixel by one level.
        diff = np.abs(pixels(together) - pixels(alone))
        assert diff.max() <= 2
        assert diff.mean() < 0.05
    assert not np.array_equal(pixels(pair[0]), pixels(pair[1]))


def test_clip_skip_applies_to_positive_and_negative(generator):
    import torch

    pipe = generator.load()
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    prompts = ["a red dress, long sleeves", "lowres, blurry"]
    last, _ = encode_prompts(tokenizer, encoder, prompts, clip_skip=1)
    penultimate, _ = encode_prompts(tokenizer, encoder, prompts, clip_skip=2)
    assert last.shape == penultimate.shape == (2, 77, 32)
    for row in range(2):
        assert not torch.allclose(last[row], penultimate[row])

    # WebUI semantics: skip n = the n-th hidden state from the end, then the final
    # layer norm; skip 1 is the ordinary last hidden state.
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=77,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        assert torch.allclose(last, out.last_hidden_state)
        assert torch.allclose(penultimate, norm(out.hidden_states[-2]))


def test_generator_encodes_negative_prompt_with_clip_skip(generator, monkeypatch):
    calls = []

    def spy(encoder, prompts, clip_skip):
        calls.append(([len(chunks) for chunks in prompts], clip_skip))
        return encode_chunks(encoder, prompts, clip_skip)

    monkeypatch.setattr(diffusers_generator, "encode_chunks", spy)
    generator.generate([spec(0, "a coat", "ugly")], [1])
    assert calls == [([1], 2), ([1], 2)]


def test_the_negative_prompt_is_encoded_once(smoke_dir, monkeypatch):
    gen = make_generator(smoke_dir)
    calls = []

    def spy(encoder, prompts, clip_skip):
        calls.append(prompts)
        return encode_chunks(encoder, prompts, clip_skip)

    monkeypatch.setattr(diffusers_generator, "encode_chunks", spy)
    first = gen.generate([spec(0, "a coat", "ugly")], [5])[0]
    assert len(calls) == 2  # positive, negative
    second, third = (
        gen.generate([spec(1, "a hat", "ugly")], [5])[0],
        gen.generate([spec(2, "a coat", "ugly")], [5])[0],
    )
    assert len(calls) == 3  # only "a hat" was new
    assert np.array_equal(pixels(first), pixels(third))
    assert not np.array_equal(pixels(first), pixels(second))
    gen.close()


def test_a_weight_changes_exactly_the_weighted_tokens(generator):
    import torch

    pipe = generator.load()
    vocab = vocabulary(pipe.tokenizer)
    plain = tokenize_prompt("a red dress", vocab)
    weighted = tokenize_prompt("a (red:1.5) dress", vocab)
    assert [c.ids for c in plain.chunks] == [c.ids for c in weighted.chunks]
    red = [i for i, w in enumerate(weighted.chunks[0].weights) if w != 1.0]
    assert red and all(weighted.chunks[0].weights[i] == 1.5 for i in red)

    encoder = pipe.text_encoder
    base = encode_chunks(encoder, [plain.chunks], clip_skip=2)[0]
    emphasised = encode_chunks(encoder, [weighted.chunks], clip_skip=2)[0]
    # WebUI: scale the weighted tokens, then rescale everything to the old mean.
    factor = (
        base.mean() / (base * torch.tensor(weighted.chunks[0].weights)[:, None]).mean()
    )
    expected = base * factor
    expected[red] *= 1.5
    assert torch.allclose(emphasised, expected, atol=1e-6)
    others = [i for i in range(77) if i not in red]
    assert torch.allclose(emphasised[others], base[others] * factor, atol=1e-6)
    assert not torch.allclose(emphasised[red], base[red] * factor)
    assert torch.allclose(emphasised.mean(), base.mean(), atol=1e-6)


def test_long_weighted_prompt_is_chunked_and_recorded(generator, monkeypatch):
    calls = []

    def spy(encoder, prompts, clip_skip):
        calls.append([[len(c.ids) for c in chunks] for chunks in prompts])
        return encode_chunks(encoder, prompts, clip_skip)

    monkeypatch.setattr(diffusers_generator, "encode_chunks", spy)
    # "the" is one token of the tiny tokenizer: 120 tokens, one of them weighted.
    prompt = "(the:1.3) " + "the " * 119
    # A negative prompt no other test uses: encodings are kept between calls.
    (candidate,) = generator.generate([spec(0, prompt, "blurry")], [1])
    assert candidate.received_prompt == "the " * 120
    assert "prompt: 120 tokens in 2 chunks; weights applied" in candidate.warnings
    assert "negative prompt: padded with 1 empty chunk(s) to 2" in candidate.warnings
    assert calls == [[[77, 77]], [[77, 77]]]  # positive, then negative
    assert not any("truncat" in w or "not applied" in w for w in candidate.warnings)
    assert candidate.image.size == (64, 96)


def test_unsupported_webui_syntax_is_named(generator):
    (candidate,) = generator.generate(
        [spec(0, "a [red:blue:0.5] dress <lora:film:0.8>")], [1]
    )
    # The WebUI would pick "red" or "blue"; here the brackets read as emphasis.
    assert candidate.received_prompt == "a red:blue:0.5 dress "
    warnings = " | ".join(candidate.warnings)
    assert "<lora:film:0.8>" in warnings and "removed" in warnings
    assert "prompt editing" in warnings


def test_hires_needs_a_denoise_in_range(smoke_dir):
    hires = {"enabled": True, "upscaler": "latent", "denoise": 0.0}
    with pytest.raises(ConfigError, match="denoise"):
        make_generator(smoke_dir, hires=hires)


def test_unknown_sampler_lists_known_names(smoke_dir):
    with pytest.raises(ConfigError) as err:
        make_generator(smoke_dir, sampler="DPM++ 3M Turbo")
    message = str(err.value)
    assert "sampler" in message and "DPM++ 3M Turbo" in message
    for name in ("DPM++ 2M SDE Karras", "DPM++ 2M Karras", "Euler a", "DDIM", "UniPC"):
        assert name in message


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_builds_on_sd_betas(generator, sampler):
    scheduler = make_scheduler(sampler, generator.load().scheduler.config)
    assert type(scheduler).__name__ == SAMPLERS[sampler][0]
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_start == 0.00085


def test_dpmpp_2m_sde_karras_mapping(generator):
    scheduler = generator.load().scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.algorithm_type == "sde-dpmsolver++"
    assert scheduler.config.use_karras_sigmas is True
    karras = make_scheduler("DPM++ 2M Karras", scheduler.config)
    assert karras.config.algorithm_type == "dpmsolver++"
    assert karras.config.use_karras_sigmas is True
    euler_a = make_scheduler("Euler a", scheduler.config)
    assert type(euler_a).__name__ == "EulerAncestralDiscreteScheduler"


def test_esrgan_without_weights_names_the_option(smoke_dir):
    hires = {"enabled": True, "upscaler": "R-ESRGAN 4x+", "scale": 2.0}
    with pytest.raises(ConfigError) as err:
        make_generator(smoke_dir, hires=hires)
    message = str(err.value)
    assert "R-ESRGAN 4x+" in message and "generator.upscaler_model" in message
    # Disabled, the same upscaler is no obstacle.
    make_generator(smoke_dir, hires={**hires, "enabled": False})
    # Weights with a weightless upscaler are a contradiction, said as such.
    with pytest.raises(ConfigError, match="upscaler_model is set"):
        make_generator(
            smoke_dir,
            hires={**hires, "upscaler": "lanczos"},
            upscaler_model=str(smoke_dir / "esrgan" / ESRGAN_FILE),
        )


def test_upscaler_file_that_is_not_a_model_is_a_config_error(smoke_dir, tmp_path):
    import torch
    from safetensors.torch import save_file

    bogus = tmp_path / "not-an-upscaler.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(bogus))
    gen = make_generator(
        smoke_dir,
        hires={"enabled": True, "upscaler": "R-ESRGAN 4x+", "scale": 2.0},
        upscaler_model=str(bogus),
    )
    with pytest.raises(ConfigError, match="generator.upscaler_model"):
        gen.load()


def test_esrgan_hires_fix(smoke_dir, monkeypatch):
    """x2 on 64x96: the ESRGAN model upscales 4x, Lanczos halves, img2img refines."""
    hires = {
        "enabled": True,
        "upscaler": "R-ESRGAN 4x+",
        "scale": 2.0,
        "steps": 2,
        "denoise": 0.45,
    }
    gen = make_generator(
        smoke_dir, hires=hires, upscaler_model=str(smoke_dir / "esrgan" / ESRGAN_FILE)
    )
    gen.load()
    applied, img2img_calls = [], []
    real_apply = gen._upscaler._apply
    real_img2img = gen._img2img

    def spy_apply(model, image):
        out = real_apply(model, image)
        applied.append((image.copy(), out.size))
        return out

    def spy_img2img(**kwargs):
        img2img_calls.append(kwargs)
        return real_img2img(**kwargs)

    monkeypatch.setattr(gen._upscaler, "_apply", spy_apply)
    monkeypatch.setattr(gen, "_img2img", spy_img2img)
    (candidate,) = gen.generate([spec(0)], [3])

    assert candidate.image.size == (128, 192)
    assert candidate.settings.hires.upscaler == "R-ESRGAN 4x+"
    ((base, model_size),) = applied  # one 4x pass reaches the target
    assert base.size == (64, 96) and model_size == (256, 384)
    assert gen._upscaler.model.architecture.name == "ESRGAN"
    assert gen._upscaler.model.scale == 4

    (call,) = img2img_calls
    assert call["strength"] == 0.45
    (upscaled,) = call["image"]
    assert upscaled.size == (128, 192)
    plain = base.resize((128, 192), Image.LANCZOS)
    assert not np.array_equal(np.asarray(upscaled), np.asarray(plain))
    assert not np.array_equal(pixels(candidate), np.asarray(upscaled))
    gen.close()


# --- NaN and black images ------------------------------------------------------------


def nan_decode(real, when):
    """A stand-in for ``_decode`` that returns NaN when ``when(vae)`` says so."""

    def decode(latents, vae):
        pixels = real(latents, vae)
        return pixels * float("nan") if when(vae) else pixels

    return decode


def test_nan_decode_gives_a_black_image_and_a_warning(smoke_dir, monkeypatch):
    gen = make_generator(smoke_dir)
    gen.load()
    monkeypatch.setattr(gen, "_decode", nan_decode(gen._decode, lambda vae: True))
    (candidate,) = gen.generate([spec(0)], [1])
    assert candidate.image.size == (64, 96)
    assert int(np.asarray(candidate.image).max()) == 0  # black, not garbage
    assert candidate.warnings == ["image: NaN from the VAE; returned black"]


def test_float16_nan_is_decoded_again_in_float32(smoke_dir, monkeypatch):
    import torch

    gen = make_generator(smoke_dir, dtype="float16")
    gen.load()
    half = nan_decode(gen._decode, lambda vae: vae.dtype == torch.float16)
    monkeypatch.setattr(gen, "_decode", half)
    (candidate,) = gen.generate([spec(0)], [1])
    assert candidate.warnings == [
        "image: NaN from the VAE in float16; decoded again in float32"
    ]
    assert pixels(candidate).std() > 2  # a real image
    assert gen._vae32.dtype == torch.float32 and gen._pipe.vae.dtype == torch.float16

    # Bad in both: black, and said so.
    monkeypatch.setattr(gen, "_decode", nan_decode(gen._decode, lambda vae: True))
    (candidate,) = gen.generate([spec(0)], [1])
    assert int(np.asarray(candidate.image).max()) == 0
    assert "in float16 and NaN in float32; returned black" in candidate.warnings[0]


def test_a_black_image_never_reaches_the_dataset(
    smoke_dir, few_refs, tmp_path, monkeypatch
):
    """A full engine run with the real generator: the first image comes out black."""
    import json

    from chatroom.engine import Engine
    from chatroom.resolve import Request

    decoded = []
    real = DiffusersGenerator._decode

    def first_black(self, latents, vae):
        pixels = real(self, latents, vae)
        decoded.append(len(decoded))
        return pixels * float("nan") if len(decoded) == 1 else pixels

    monkeypatch.setattr(DiffusersGenerator, "_decode", first_black)
    config = tmp_path / "black-run.toml"
    config.write_text(
        f"""
[extractor]
use = "static"
values = {{ garment = ["a red dress"] }}
[generator]
use = "diffusers"
model = "{(smoke_dir / "sd15").as_posix()}"
steps = 2
width = 64
height = 96
device = "cpu"
dtype = "float32"
[generator.hires]
enabled = false
[annotators.captions]
enabled = false
""",
        encoding="utf-8",
    )
    out = tmp_path / "black-run"
    flags = {"references": str(few_refs), "count": 1, "output": str(out)}
    summary = Engine(Request(str(config), flags, [])).run()

    assert summary.written == 1
    rejected = [
        json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()
    ]
    records = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    (rejection,) = rejected
    # the generator itself knows the image is unusable and says why
    assert (rejection["stage"], rejection["component"]) == ("generate", "generator")
    assert "NaN" in rejection["reason"] or "black" in rejection["reason"]
    assert any(w.startswith("image:") for w in rejection["warnings"])
    assert not (out / "images" / f"{rejection['item_id']}.png").exists()
    assert [p.name for p in (out / "images").iterdir()] == [
        f"{records[0]['item_id']}.png"
    ]
    assert not any(w.startswith("image:") for w in records[0]["warnings"])


# --- safe loading --------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickled_checkpoint_is_refused_without_allow_pickle(
    smoke_dir, tmp_path, suffix
):
    checkpoint = tmp_path / f"majicmixRealistic_v6{suffix}"
    checkpoint.write_bytes(b"not read")
    gen = make_generator(
        smoke_dir, model=str(checkpoint), config=str(smoke_dir / "sd15")
    )
    with pytest.raises(ConfigError) as err:
        gen.load()
    message = str(err.value)
    assert checkpoint.name in message and "generator.allow_pickle" in message
    assert ".safetensors" in message


def test_folder_without_safetensors_is_refused(smoke_dir, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(smoke_dir / "sd15", folder)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_suffix(".bin"))
    with pytest.raises(ConfigError, match="generator.allow_pickle"):
        make_generator(smoke_dir, model=str(folder)).load()


def test_allowed_pickle_loads_weights_only(smoke_dir, tmp_path):
    import pickle

    import torch

    from chatroom.smoke import sd15_single_file_state_dict

    checkpoint = tmp_path / "sd15.ckpt"
    state = sd15_single_file_state_dict(smoke_dir / "sd15")
    torch.save({"state_dict": state}, checkpoint)
    options = {"model": str(checkpoint), "config": str(smoke_dir / "sd15")}
    gen = make_generator(smoke_dir, allow_pickle=True, **options)
    assert gen.load().unet is not None
    gen.close()

    # weights_only refuses a pickle that would call a function when loaded.
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": Payload()}))
    options["model"] = str(evil)
    with pytest.raises(ConfigError, match="cannot load evil.ckpt"):
        make_generator(smoke_dir, allow_pickle=True, **options).load()
    assert not marker.exists()


def test_single_file_safetensors_loads_offline_and_matches_the_folder(
    smoke_dir, generator
):
    from safetensors import safe_open

    single = smoke_dir / "sd15.safetensors"
    with safe_open(str(single), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in keys)

    gen = make_generator(smoke_dir, model=str(single), config=str(smoke_dir / "sd15"))
    (from_file,) = gen.generate([spec(0)], [21])
    (from_folder,) = generator.generate([spec(0)], [21])
    assert np.array_equal(pixels(from_file), pixels(from_folder))
    assert gen.describe()["sha256"] != generator.describe()["sha256"]
    gen.close()


def test_empty_model_says_what_to_set(smoke_dir):
    with pytest.raises(ConfigError, match="generator.model"):
        make_generator(smoke_dir, model="")


def test_single_file_without_config_fails_fast(smoke_dir, tmp_path):
    checkpoint = tmp_path / "majicmixRealistic_v6.safetensors"
    checkpoint.write_bytes(b"")
    gen = make_generator(smoke_dir, model=str(checkpoint))
    with pytest.raises(ConfigError, match="generator.config"):
        gen.load()
    gen = make_generator(smoke_dir, model=str(checkpoint), config=str(tmp_path))
    with pytest.raises(ConfigError, match="model_index.json"):
        gen.load()


def test_a_folder_of_photos_as_model_is_one_config_error(smoke_dir, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "beach.jpg")
    with pytest.raises(ConfigError) as err:
        make_generator(smoke_dir, model=str(photos))
    message = str(err.value)
    assert "\n" not in message and str(photos) in message
    assert "generator.model" in message and "model_index.json" in message
    assert ".safetensors" in message and "Hub id" in message


def test_a_file_that_is_no_checkpoint_is_one_config_error(smoke_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model\n")
    with pytest.raises(ConfigError, match="generator.model"):
        make_generator(smoke_dir, model=str(notes))

    fake = tmp_path / "fake.safetensors"
    fake.write_text("not a model\n")
    gen = make_generator(smoke_dir, model=str(fake), config=str(smoke_dir / "sd15"))
    with pytest.raises(ConfigError) as err:
        gen.load()
    message = str(err.value)
    assert "\n" not in message and "generator.model" in message and "fake" in message


@pytest.mark.parametrize("damage", ["no unet", "garbled index"])
def test_a_broken_diffusers_folder_fails_as_config_when_it_loads(
    smoke_dir, tmp_path, damage
):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(smoke_dir / "sd15", folder)
    if damage == "no unet":
        shutil.rmtree(folder / "unet")
    else:
        (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        make_generator(smoke_dir, model=str(folder)).load()
    message = str(err.value)
    assert "\n" not in message and "generator.model" in message
    assert str(folder) in message


def test_an_upscaler_file_that_is_text_is_a_config_error(smoke_dir, tmp_path):
    fake = tmp_path / "RealESRGAN_x4plus.safetensors"
    fake.write_text("not a model\n")
    gen = make_generator(
        smoke_dir,
        hires={"enabled": True, "upscaler": "R-ESRGAN 4x+", "scale": 2.0},
        upscaler_model=str(fake),
    )
    with pytest.raises(ConfigError) as err:
        gen.load()
    assert "generator.upscaler_model" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_run_with_a_broken_model_stops_with_one_line(smoke_dir, few_refs, tmp_path):
    """Found only when the pipeline loads, the bad model still stops the run: no
    candidate is marked failed and no "raise max_candidates" advice is given."""
    import shutil

    from click.testing import CliRunner

    from chatroom.cli import main

    folder = tmp_path / "broken"
    shutil.copytree(smoke_dir / "sd15", folder)
    shutil.rmtree(folder / "unet")
    out = tmp_path / "out"
    args = ["run", "-c", str(smoke_dir / "smoke.toml"), "--no-extraction"]
    args += ["--references", str(few_refs)]
    args += ["-n", "2", "--max-candidates", "3", "-o", str(out)]
    args += ["--set", f'generator.model="{folder}"']
    result = CliRunner().invoke(main, args)
    assert result.exit_code not in (0, 3), result.output
    assert "generator.model" in result.output and "Traceback" not in result.output
    assert "max_candidates" not in result.output
    failures = out / "failures.jsonl"
    assert not failures.exists() or not failures.read_text().strip()


def test_a_depth_model_that_cannot_load_is_one_config_error(smoke_dir, tmp_path):
    import shutil

    from chatroom.plugins.control_maps import DepthMap

    def load(model):
        raw = {"model": str(model), "device": "cpu"}
        options = validate_options(DepthMap, "annotators.depth_map", raw)
        return DepthMap(options, Context(domain=None))._load()

    photos = tmp_path / "photos"
    photos.mkdir()
    text = tmp_path / "depth.pth"
    text.write_text("not a model\n")
    garbled = tmp_path / "garbled"
    shutil.copytree(smoke_dir / "depth", garbled)
    for weights in garbled.glob("*.safetensors"):
        weights.write_text("not a model\n")
    for model, what in ((photos, "config.json"), (text, "not a folder")):
        with pytest.raises(ConfigError) as err:
            load(model)
        message = str(err.value)
        assert "option 'model'" in message and str(model) in message
        assert what in message and "\n" not in message
    with pytest.raises(ConfigError, match="cannot load depth model"):
        load(garbled)


def test_hires_size_rounds_to_multiples_of_8():
    assert hires_size(64, 96, 1.5) == (96, 144)
    assert hires_size(512, 768, 2.0) == (1024, 1536)
    assert hires_size(64, 96, 1.3) == (80, 128)


@pytest.mark.parametrize("upscaler", ["latent", "lanczos"])
def test_hires_output_is_base_times_scale(smoke_dir, upscaler):
    hires = {
        "enabled": True,
        "upscaler": upscaler,
        "scale": 1.5,
        "steps": 2,
        "denoise": 0.5,
    }
    gen = make_generator(smoke_dir, hires=hires)
    first, again = gen.generate([spec(0), spec(1)], [5, 5])
    assert first.image.size == (96, 144)
    assert first.settings.hires.enabled and first.settings.hires.upscaler == upscaler
    assert np.array_equal(pixels(first), pixels(again))


def test_describe_hashes_the_model(smoke_dir, generator):
    info = generator.describe()
    expected = hashlib.sha256(
        (smoke_dir / "sd15" / "model_index.json").read_bytes()
    ).hexdigest()
    assert info["sha256"] == expected
    assert info["model"] == str(smoke_dir / "sd15")
    assert info["diffusers"]


# --- plugin plumbing ---------------------------------------------------------------


def test_plugins_register_their_components():
    registered = []
    diffusers_generator.register_generators(registered.append)
    blip2.register_extractors(registered.append)
    blip2.register_annotators(registered.append)
    assert registered == [DiffusersGenerator, Blip2Extractor, Blip2Captions]
    assert [c.name for c in registered] == ["diffusers", "blip2", "blip2_captions"]
    for component in registered:
        for generic in ("use", "mode", "enabled"):
            assert generic not in component.Options.model_fields


def test_plugin_modules_do_not_import_heavy_libraries():
    code = (
        "import sys, chatroom.plugins.blip2, chatroom.plugins.diffusers_generator\n"
        "heavy = ('torch', 'diffusers', 'transformers')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_library_names_the_extra(smoke_dir, domain, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    extractor = make_extractor(smoke_dir, domain)
    with pytest.raises(MissingDependency, match=r"chatroom\[transformers\]"):
        extractor.load()
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(MissingDependency, match=r"chatroom\[diffusers\]"):
        make_generator(smoke_dir).load()


# --- BLIP-2: the guard -----------------------------------------------------------

QUESTION = "What clothes is the person wearing?"


@pytest.mark.parametrize(
    ("answer", "problem"),
    [
        ("a black leather jacket and jeans", None),
        ("blue", None),
        ("", "empty"),
        ("   ", "empty"),
        ("What clothes is the person wearing", "echo"),
        ("the person is wearing clothes", "echo"),
        ("Question: what is the person wearing? Answer: a dress", "echo"),
        ("dress dress dress", "repetitive"),
        ("red blue red blue red blue red blue", "repetitive"),
        ("lalalalalalala", "repetitive"),
        ("#### 1234 ??? 5678", "not words"),
        ("a qwertyuiopasdfghjklzxcvbnmpoiuytrewq", "not words"),
    ],
)
def test_answer_guard(answer, problem):
    assert answer_problem(answer, QUESTION) == problem


def test_clean_answer():
    assert clean_answer("  Answer: a red   dress. ") == "a red dress"
    assert clean_answer('"jeans",') == "jeans"


def test_parse_attributes():
    answer = "Color, fabric and sleeve length; the fit, fashion, 1234, a neckline"
    known = ["color", "fashion", "person"]
    assert parse_attributes(answer, known, 3) == ["fabric", "sleeve_length", "fit"]
    assert parse_attributes(answer, known, 0) == []
    assert parse_attributes("colors, patterns", ["color", "pattern"], 3) == []


# --- BLIP-2: scripted fake VLM -----------------------------------------------------


class ScriptedVLM:
    """Stands in for the model call: answers by question, beam count and image width.

    ``script[(question, beams)][width]`` is the raw text the model "generates"; every
    call is recorded with the widths of the images it got.
    """

    def __init__(self, script):
        self.script = script
        self.calls = []

    def __call__(self, images, question, num_beams=1):
        widths = [im.size[0] for im in images]
        self.calls.append((question, num_beams, widths))
        answers = self.script.get((question, num_beams), {})
        return [answers.get(w, "") for w in widths]


def make_extractor(smoke_dir, domain, cache=None, **overrides):
    raw = {"model": str(smoke_dir / "blip2"), "device": "cpu", "max_new_tokens": 8}
    raw.update(overrides)
    options = validate_options(Blip2Extractor, "extractor", raw)
    return Blip2Extractor(options, Context(domain=domain, cache=cache))


def make_captions(smoke_dir, domain, **overrides):
    raw = {"model": str(smoke_dir / "blip2"), "device": "cpu", "max_new_tokens": 12}
    raw.update(overrides)
    options = validate_options(Blip2Captions, "annotator", raw)
    return Blip2Captions(options, Context(domain=domain))


def fake_references(tmp_path, widths):
    refs = []
    for width in widths:
        path = tmp_path / f"ref{width}.png"
        Image.new("RGB", (width, 20), (width, 0, 0)).save(path)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        refs.append(
            Reference(
                id=f"ref{width}", path=str(path), sha256=digest, width=width, height=20
            )
        )
    return refs


class DictCache:
    def __init__(self):
        self.data = {}
        self.gets = 0

    def get(self, key):
        self.gets += 1
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value


KEY_Q = "What are the key attributes of fashion?"
GARMENT_Q = "What clothes is the person wearing?"
COLOR_Q = "What color are the person's clothes?"
FABRIC_Q = "What is the fabric of the person?"
NECKLINE_Q = "What is the neckline of the person?"

EXTRACTOR_SCRIPT = {
    (KEY_Q, 1): {10: "colour, fabric and neckline, the color, shoes"},
    (GARMENT_Q, 1): {10: "a black leather jacket.", 11: ""},
    (GARMENT_Q, 3): {11: "a white shirt"},
    (COLOR_Q, 1): {10: "What color are the person's clothes", 11: "blue"},
    (COLOR_Q, 3): {10: "color color color color"},
    (FABRIC_Q, 1): {10: "leather", 11: "cotton"},
    (NECKLINE_Q, 1): {10: "v neck v neck v neck v neck", 11: "round"},
    (NECKLINE_Q, 3): {10: "Answer: v-neck"},
}


def test_extractor_with_scripted_answers(smoke_dir, domain, tmp_path, monkeypatch):
    fake = ScriptedVLM(EXTRACTOR_SCRIPT)
    monkeypatch.setattr(
        Blip2Asker, "_generate_answers", lambda self, *a, **k: fake(*a, **k)
    )
    refs = fake_references(tmp_path, [10, 11])
    bank = make_extractor(smoke_dir, domain, discover=2).extract(refs, domain)

    # "colour" is new (a spelling is not a known name); "the color" is known.
    assert bank.discovered == ["colour", "fabric"]
    assert bank.attributes == ["garment", "color", "colour", "fabric"]
    got = {(e.attribute, e.reference): e.value for e in bank.entries}
    assert got == {
        ("garment", "ref10"): "a black leather jacket",
        ("garment", "ref11"): "a white shirt",  # empty, then beam search
        ("color", "ref11"): "blue",  # ref10: echo, then a loop: skipped
        ("fabric", "ref10"): "leather",
        ("fabric", "ref11"): "cotton",
    }
    assert all(e.question for e in bank.entries)
    # The key question goes to the first reference only; one retry per bad answer.
    assert fake.calls[0] == (KEY_Q, 1, [10])
    assert (GARMENT_Q, 1, [10, 11]) in fake.calls
    assert (GARMENT_Q, 3, [11]) in fake.calls
    assert (COLOR_Q, 3, [10]) in fake.calls
    assert not any(q == FABRIC_Q and beams == 3 for q, beams, _ in fake.calls)


def test_cache_hit_does_not_ask_again(smoke_dir, domain, tmp_path, monkeypatch):
    fake = ScriptedVLM(EXTRACTOR_SCRIPT)
    monkeypatch.setattr(
        Blip2Asker, "_generate_answers", lambda self, *a, **k: fake(*a, **k)
    )
    refs = fake_references(tmp_path, [10, 11])
    cache = DictCache()
    first = make_extractor(smoke_dir, domain, cache=cache, discover=2).extract(
        refs, domain
    )
    assert fake.calls
    model = str(smoke_dir / "blip2")
    key = f"blip2:{model}:{refs[0].sha256}:{GARMENT_Q}"
    assert cache.data[key] == "a black leather jacket"
    assert cache.data[f"blip2:{model}:{refs[0].sha256}:{COLOR_Q}"] == ""  # unusable

    def refuse(self, *args, **kwargs):
        raise AssertionError("the model was asked although the cache had the answer")

    monkeypatch.setattr(Blip2Asker, "_generate_answers", refuse)
    again = make_extractor(smoke_dir, domain, cache=cache, discover=2).extract(
        refs, domain
    )
    assert again.model_dump() == first.model_dump()
    assert cache.gets > 0


def caption_candidates(widths):
    out = []
    for i, width in enumerate(widths):
        image = Image.new("RGB", (width, 20), "white") if width else None
        out.append(
            Candidate(
                index=i,
                item_id=f"c{i}",
                spec=spec(i),
                settings={"seed": i},
                image=image,
            )
        )
    return out


CQ1 = "Describe the person's outfit in detail."
CQ2 = "What is the person wearing?"
CQ3 = "What does the person in the picture look like?"
CAPTION_SCRIPT = {
    (CQ1, 1): {
        10: "a woman in a long red dress with a black belt",
        11: "a dress",
        12: "",
    },
    (CQ1, 3): {12: "describe the person's outfit in detail"},
    (CQ2, 1): {11: "shirt shirt shirt shirt", 12: "What is the person wearing?"},
    (CQ2, 3): {11: "", 12: "#### ####"},
    (CQ3, 1): {11: "a tall man wearing a grey coat and white sneakers", 12: ""},
    (CQ3, 3): {12: "the the the the"},
}


def test_captions_fall_back_in_order_and_reject(smoke_dir, domain, monkeypatch):
    fake = ScriptedVLM(CAPTION_SCRIPT)
    monkeypatch.setattr(
        Blip2Asker, "_generate_answers", lambda self, *a, **k: fake(*a, **k)
    )
    candidates = caption_candidates([10, 11, 12, 0])
    annotations = make_captions(smoke_dir, domain, min_words=5).annotate(
        candidates, [[] for _ in candidates]
    )
    first, fallback, rejected, no_image = annotations

    assert first.caption == "a woman in a long red dress with a black belt"
    assert first.captions == [first.caption] and first.rejected is None

    # "a dress" is sensible but short; question 2 loops; question 3 is usable.
    assert fallback.caption == "a tall man wearing a grey coat and white sneakers"
    assert fallback.captions == ["a dress", fallback.caption]

    assert rejected.caption is None
    assert rejected.rejected.startswith("no usable caption:")
    assert "echo" in rejected.rejected and "empty" in rejected.rejected
    assert no_image.rejected == "no image"
    assert all(a.annotator == "blip2_captions" for a in annotations)

    # Images with the same question go together; only the undecided go on.
    greedy = [(q, widths) for q, beams, widths in fake.calls if beams == 1]
    assert greedy == [(CQ1, [10, 11, 12]), (CQ2, [11, 12]), (CQ3, [11, 12])]


# --- BLIP-2: the tiny real model ---------------------------------------------------


def real_references(folder, count):
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    refs = []
    for path in paths[:count]:
        with Image.open(path) as im:
            width, height = im.size
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        refs.append(
            Reference(
                id=path.stem, path=str(path), sha256=digest, width=width, height=height
            )
        )
    return refs


def test_extractor_on_real_photos(smoke_dir, domain, fashion_refs, monkeypatch):
    raw_answers = []
    real = Blip2Asker._generate_answers

    def record(self, images, question, num_beams=1):
        out = real(self, images, question, num_beams)
        raw_answers.append((question, num_beams, out))
        return out

    monkeypatch.setattr(Blip2Asker, "_generate_answers", record)
    refs = real_references(fashion_refs, 2)
    cache = DictCache()
    extractor = make_extractor(smoke_dir, domain, cache=cache, discover=2)
    bank = extractor.extract(refs, domain)
    extractor.close()

    assert bank.domain == "fashion" and bank.extractor == "blip2"
    assert bank.attributes[:2] == ["garment", "color"]
    assert len(bank.discovered) <= 2
    # Random weights answer garbage: whatever reached the bank passed the guard,
    # and every greedy answer the guard refused was asked again with beams.
    for entry in bank.entries:
        assert entry.reference in {r.id for r in refs}
        assert answer_problem(entry.value, entry.question) is None
    for question, beams, answers in raw_answers:
        if beams != 1:
            continue
        bad = [a for a in answers if answer_problem(clean_answer(a), question)]
        retried = [c for c in raw_answers if c[0] == question and c[1] == 3]
        assert bool(bad) == bool(retried)
    asked = {q for q, _, _ in raw_answers}
    assert {GARMENT_Q, COLOR_Q} <= asked
    assert len(cache.data) == 1 + len(bank.attributes) * len(refs)


def test_captions_on_generated_images(smoke_dir, domain, generator):
    candidates = generator.generate([spec(0), spec(1)], [1, 2])
    annotator = make_captions(smoke_dir, domain, min_words=2, batch_size=2)
    annotations = annotator.annotate(candidates, [[], []])
    annotator.close()
    assert len(annotations) == 2
    for annotation in annotations:
        assert annotation.annotator == "blip2_captions"
        if annotation.rejected is None:
            assert len(annotation.caption.split()) >= 2
            assert answer_problem(annotation.caption, CQ1) is None
        else:
            assert annotation.rejected.startswith("no usable caption:")


def test_blip2_missing_folder_is_a_config_error(domain, tmp_path):
    extractor = make_extractor(tmp_path, domain)
    with pytest.raises(ConfigError, match="does not exist"):
        extractor.load()
    (tmp_path / "blip2").mkdir()
    with pytest.raises(ConfigError, match="cannot load BLIP-2 model"):
        make_extractor(tmp_path, domain).load()


# --- reproducibility -----------------------------------------------------------------

GENERATE_ONCE = """
import hashlib, io, sys, tomllib
from chatroom.components import Context, validate_options
from chatroom.models import PromptSpec
from chatroom.plugins.diffusers_generator import DiffusersGenerator

raw = tomllib.loads(open(sys.argv[1], encoding="utf-8").read())["generator"]
raw.pop("use")
generator = DiffusersGenerator(
    validate_options(DiffusersGenerator, "generator", raw), Context(domain=None)
)
spec = PromptSpec(
    index=0,
    item_id="x",
    prompt="(a red dress:1.2), long sleeves",
    negative_prompt="lowres",
)
(candidate,) = generator.generate([spec], [1234])
png = io.BytesIO()
candidate.image.save(png, format="PNG")
print(hashlib.sha256(png.getvalue()).hexdigest(), candidate.image.size)
"""


@pytest.mark.slow
def test_same_config_and_seed_give_identical_pngs_across_processes(smoke_dir):
    """This process and a fresh one, the smoke config (ESRGAN hires fix, pinned
    threads), one seed: the PNG bytes match."""
    import io
    import runpy
    from contextlib import redirect_stdout

    config = smoke_dir / "smoke.toml"
    other = subprocess.Popen(
        [sys.executable, "-c", GENERATE_ONCE, str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    script = smoke_dir.parent / "generate_once.py"
    script.write_text(GENERATE_ONCE, encoding="utf-8")
    here = io.StringIO()
    argv = sys.argv
    try:
        sys.argv = [str(script), str(config)]
        with redirect_stdout(here):
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    stdout, stderr = other.communicate(timeout=120)
    assert other.returncode == 0, stderr
    assert here.getvalue().strip() == stdout.strip()
    assert stdout.strip().endswith("(128, 192)")
