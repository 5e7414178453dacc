"""The tiny random-weight models load with the libraries' own loaders."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from chatroom.components import validate_options  # noqa: E402
from chatroom.plugins.blip2 import Blip2Captions, Blip2Extractor  # noqa: E402
from chatroom.plugins.diffusers_generator import DiffusersGenerator  # noqa: E402
from chatroom.resolve import GENERIC_KEYS  # noqa: E402
from chatroom.smoke import write_smoke_models  # noqa: E402


def _digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.safetensors"))
    }


def test_writes_small_model_folders(smoke_dir):
    for name in (
        "sd15/model_index.json",
        "sd15/unet/diffusion_pytorch_model.safetensors",
        "sd15/vae/diffusion_pytorch_model.safetensors",
        "sd15/text_encoder/model.safetensors",
        "sd15/tokenizer/vocab.json",
        "sd15/tokenizer/merges.txt",
        "sd15/scheduler/scheduler_config.json",
        "sd15.safetensors",
        "sdxl/model_index.json",
        "sdxl/unet/diffusion_pytorch_model.safetensors",
        "sdxl/text_encoder/model.safetensors",
        "sdxl/text_encoder_2/model.safetensors",
        "sdxl/tokenizer_2/vocab.json",
        "esrgan/RealESRGAN_x4plus-smoke.safetensors",
        "blip2/config.json",
        "blip2/model.safetensors",
        "blip2/processor_config.json",
        "clip/model.safetensors",
        "clip/processor_config.json",
        "clip_nsfw/head.safetensors",
        "nima/nima-smoke.safetensors",
        "openpose/body_pose_model.pth",
        "graphonomy/inference.pth",
        "smoke.toml",
    ):
        assert (smoke_dir / name).is_file(), name
    # OpenPose's and Graphonomy's architectures are fixed: those two are full size
    full_size = {"openpose": 210e6, "graphonomy": 170e6}
    total = sum(
        p.stat().st_size
        for p in smoke_dir.rglob("*")
        if p.is_file() and p.relative_to(smoke_dir).parts[0] not in full_size
    )
    assert total < 30 * 1024 * 1024
    for folder, limit in full_size.items():
        assert sum(p.stat().st_size for p in (smoke_dir / folder).iterdir()) < limit


def test_weights_are_deterministic(smoke_dir, tmp_path):
    again = write_smoke_models(tmp_path / "again")
    assert _digests(again) == _digests(smoke_dir)
    # SD 1.5: unet, vae, text encoder, the single file; esrgan; blip2;
    # SDXL: unet, vae, two text encoders; CLIP, its NSFW head, NIMA; depth
    assert len(_digests(again)) == 10 + 3 + 1
    for checkpoint in ("openpose/body_pose_model.pth", "graphonomy/inference.pth"):
        digest = hashlib.sha256((again / checkpoint).read_bytes()).hexdigest()
        assert (
            digest == hashlib.sha256((smoke_dir / checkpoint).read_bytes()).hexdigest()
        )


def test_sd15_loads_with_diffusers(smoke_dir):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(smoke_dir / "sd15"), safety_checker=None, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    ids = pipe.tokenizer("the red dress and shoes").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id
    assert ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == (
        "the red dress and shoes"
    )

    image = pipe(
        "a photo",
        width=64,
        height=96,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 96)


def test_smoke_set_writes_quickly(tmp_path):
    import time

    started = time.perf_counter()
    write_smoke_models(tmp_path / "timed")
    assert time.perf_counter() - started < 15


def test_blip2_loads_with_transformers(smoke_dir):
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor.from_pretrained(
        str(smoke_dir / "blip2"), local_files_only=True
    )
    model = Blip2ForConditionalGeneration.from_pretrained(
        str(smoke_dir / "blip2"), local_files_only=True
    )
    config = model.config
    assert processor.num_query_tokens == config.num_query_tokens == 4
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == (
        config.image_token_index
    )

    image = Image.new("RGB", (40, 60), "white")
    inputs = processor(
        images=[image],
        text=["Question: What is the person wearing? Answer:"],
        return_tensors="pt",
    )
    # The processor puts one image token per query before the text.
    ids = inputs["input_ids"][0].tolist()
    assert ids[: config.num_query_tokens] == [config.image_token_index] * 4
    assert ids.count(config.image_token_index) == config.num_query_tokens
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > len(ids)
    assert isinstance(processor.tokenizer.decode(out[0, len(ids) :]), str)


def test_smoke_config_points_at_the_models(smoke_dir):
    config = tomllib.loads((smoke_dir / "smoke.toml").read_text(encoding="utf-8"))
    assert config["extractor"]["use"] == "blip2"
    assert config["generator"]["use"] == "diffusers"
    assert config["generator"]["hires"] == {
        "enabled": True,
        "upscaler": "R-ESRGAN 4x+",
        "scale": 2.0,
        "steps": 2,
        "denoise": 0.5,
    }
    upscaler = smoke_dir / "esrgan" / "RealESRGAN_x4plus-smoke.safetensors"
    assert config["generator"]["upscaler_model"] == upscaler.as_posix()
    assert config["annotators"]["captions"]["mode"] == "observe"

    # Each section is valid for its component once the engine's generic keys go.
    sections = [
        (Blip2Extractor, config["extractor"]),
        (DiffusersGenerator, config["generator"]),
        (Blip2Captions, config["annotators"]["captions"]),
    ]
    for component, raw in sections:
        options = {k: v for k, v in raw.items() if k not in GENERIC_KEYS}
        validated = validate_options(component, component.stage, options)
        assert (smoke_dir / validated.model.split("/")[-1]).is_dir()
        for key in GENERIC_KEYS:
            assert key not in component.Options.model_fields


def test_single_file_has_the_original_layout_and_round_trips(smoke_dir):
    """diffusers' own converter turns the single file back into the folder's weights."""
    import json

    import torch
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    single = load_file(str(smoke_dir / "sd15.safetensors"))
    for part, convert in (
        ("unet", convert_ldm_unet_checkpoint),
        ("vae", convert_ldm_vae_checkpoint),
    ):
        folder = smoke_dir / "sd15" / part
        config = json.loads((folder / "config.json").read_text())
        expected = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
        converted = convert(single, config)
        assert set(converted) == set(expected), part
        for key, tensor in expected.items():
            assert torch.equal(converted[key], tensor), key


def test_esrgan_loads_with_spandrel_as_realesrgan(smoke_dir):
    import torch
    from safetensors.torch import load_file

    spandrel = pytest.importorskip("spandrel")
    state = load_file(str(smoke_dir / "esrgan" / "RealESRGAN_x4plus-smoke.safetensors"))
    # Real-ESRGAN's (BasicSR's) names, not the old ESRGAN "model.N" ones.
    assert {"conv_first.weight", "conv_up2.weight", "conv_last.weight"} <= set(state)
    assert "body.1.rdb3.conv5.weight" in state
    model = spandrel.ModelLoader().load_from_state_dict(state)
    assert model.architecture.name == "ESRGAN" and model.scale == 4
    out = model(torch.rand(1, 3, 12, 8))
    assert tuple(out.shape) == (1, 3, 48, 32)


def test_clip_and_nima_load_like_real_ones(smoke_dir):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from chatroom.plugins.clip_nsfw import ClipNsfwFilter
    from chatroom.plugins.quality import QualityFilter, score_images

    clip = smoke_dir / "clip"
    model = CLIPModel.from_pretrained(str(clip), local_files_only=True)
    processor = CLIPProcessor.from_pretrained(str(clip), local_files_only=True)
    inputs = processor(
        text=["a red dress"], images=[Image.new("RGB", (48, 64))], return_tensors="pt"
    )
    out = model(**inputs)
    assert tuple(out.image_embeds.shape) == (1, model.config.projection_dim)

    config = tomllib.loads((smoke_dir / "smoke.toml").read_text(encoding="utf-8"))
    for component, key in ((ClipNsfwFilter, "clip_nsfw"), (QualityFilter, "quality")):
        raw = config["filters"][key]
        assert raw["mode"] == "observe"  # random weights judge nothing
        options = {k: v for k, v in raw.items() if k not in GENERIC_KEYS}
        validate_options(component, component.stage, options)

    nima = config["filters"]["quality"]["weights"]
    [score] = score_images([Image.new("RGB", (64, 96), "grey")], "nima", nima)
    assert 1 <= score <= 10


def test_openpose_and_graphonomy_sections_point_at_their_checkpoints(smoke_dir):
    from chatroom.plugins.graphonomy import GraphonomyAnnotator
    from chatroom.plugins.openpose import OpenPoseFilter

    config = tomllib.loads((smoke_dir / "smoke.toml").read_text(encoding="utf-8"))
    sections = (
        (OpenPoseFilter, config["filters"]["openpose"], "body_pose_model.pth"),
        (GraphonomyAnnotator, config["annotators"]["graphonomy"], "inference.pth"),
    )
    for component, raw, file in sections:
        # random weights find nobody and parse noise: both only observe
        assert raw["mode"] == "observe" and raw["enabled"] is True
        options = {k: v for k, v in raw.items() if k not in GENERIC_KEYS}
        validated = validate_options(component, component.stage, options)
        assert (Path(validated.checkpoint) / file).is_file()


# --- where the smoke models go ---------------------------------------------------


def _smoke_models_cli(target):
    from click.testing import CliRunner

    from chatroom.cli import main

    return CliRunner().invoke(main, ["smoke-models", str(target)])


def test_a_file_given_as_the_folder_is_one_line(tmp_path):
    target = tmp_path / "models.txt"
    target.write_text("mine\n")
    result = _smoke_models_cli(target)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert str(target) in result.output and "not a folder" in result.output
    assert target.read_text() == "mine\n"


def test_a_smoke_toml_the_user_wrote_is_never_overwritten(tmp_path):
    mine = tmp_path / "smoke.toml"
    mine.write_text('[generator]\nuse = "webui"\n')
    result = _smoke_models_cli(tmp_path)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.splitlines()) == 1
    assert str(mine) in result.output and "smoke-models" in result.output
    assert mine.read_text() == '[generator]\nuse = "webui"\n'
    assert not (tmp_path / "sd15").exists()  # refused before any model is written


def test_its_own_smoke_toml_is_rewritten(tmp_path, smoke_dir):
    from chatroom.errors import InputError
    from chatroom.smoke import check_smoke_config, smoke_config

    ours = smoke_config(tmp_path)
    path = tmp_path / "smoke.toml"
    path.write_text(ours, encoding="utf-8")
    check_smoke_config(tmp_path)  # identical
    first, _, rest = ours.partition("\n")
    path.write_text(f"{first}\n# an older version\n{rest[:200]}", encoding="utf-8")
    check_smoke_config(tmp_path)  # written by smoke-models, edited since
    path.write_text(f"# my notes\n{ours}", encoding="utf-8")
    with pytest.raises(InputError, match="not written by"):
        check_smoke_config(tmp_path)
    # the session's smoke models were written over nothing, and their config is ours
    check_smoke_config(smoke_dir)
