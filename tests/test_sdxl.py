"""SDXL through the diffusers generator, on the tiny random-weight SDXL folder."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import numpy as np  # noqa: E402

from chatroom.components import Context, validate_options  # noqa: E402
from chatroom.models import PromptSpec  # noqa: E402
from chatroom.plugins import diffusers_generator  # noqa: E402
from chatroom.plugins.diffusers_generator import (  # noqa: E402
    DiffusersGenerator,
    encode_chunks,
    is_sdxl,
)
from chatroom.plugins.prompt_weighting import (  # noqa: E402
    apply_emphasis,
    tokenize_prompt,
)
from chatroom.smoke import ESRGAN_FILE  # noqa: E402


def make_generator(smoke_dir, **overrides):
    raw = {
        "model": str(smoke_dir / "sdxl"),
        "steps": 2,
        "cfg_scale": 5.0,
        "width": 64,
        "height": 96,
        "sampler": "Euler a",
        "device": "cpu",
        "dtype": "float32",
    }
    raw.update(overrides)
    options = validate_options(DiffusersGenerator, "generator", raw)
    return DiffusersGenerator(options, Context(domain=None))


@pytest.fixture(scope="module")
def generator(smoke_dir):
    gen = make_generator(smoke_dir)
    yield gen
    gen.close()


def spec(index, prompt="a photo of a woman in a red dress", negative="lowres"):
    return PromptSpec(
        index=index, item_id=f"item-{index}", prompt=prompt, negative_prompt=negative
    )


def pixels(candidate):
    return np.asarray(candidate.image).astype(np.int16)


def test_sdxl_folder_loads_with_diffusers(smoke_dir):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        str(smoke_dir / "sdxl"), local_files_only=True, add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    width_l = pipe.text_encoder.config.hidden_size
    width_g = pipe.text_encoder_2.config.hidden_size
    assert width_l != width_g
    assert unet.cross_attention_dim == width_l + width_g
    pooled = pipe.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == (
        pooled + 6 * unet.addition_time_embed_dim
    )
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    # The second tokenizer pads with "!", not with EOS (OpenCLIP's padding).
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.tokenizer_2.pad_token_id != pipe.tokenizer_2.eos_token_id
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    assert pipe.vae.config.scaling_factor == 0.13025
    assert pipe.vae_scale_factor == 8

    # diffusers' own prompt encoding and sampling run on it.
    image = pipe(
        "a photo",
        width=64,
        height=96,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 96)
    assert is_sdxl(smoke_dir / "sdxl") and not is_sdxl(smoke_dir / "sd15")


def test_generates_sdxl_images_of_the_configured_size(generator):
    (candidate,) = generator.generate([spec(0)], [42])
    assert generator._sdxl
    assert type(generator._pipe).__name__ == "StableDiffusionXLPipeline"
    assert candidate.image.size == (64, 96)
    assert candidate.settings.seed == 42
    assert candidate.warnings == []
    assert pixels(candidate).std() > 0


def test_sdxl_same_seed_same_pixels(generator):
    first, again, other = generator.generate([spec(0), spec(1), spec(2)], [7, 7, 8])
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


def test_sdxl_encoding_is_webui_style(smoke_dir, generator):
    """Both penultimate layers without the final norm, side by side; bigG's pooled
    output of the first chunk, before emphasis; CLIP skip 1 and 2 alike."""
    import torch

    pipe = generator.load()
    prompt = "a (red:1.4) dress"
    conditioning = {}
    real_sample = generator._sample

    def capture(cond, seeds):
        conditioning.update(cond)
        return real_sample(cond, seeds)

    generator._sample = capture
    try:
        generator.generate([spec(0, prompt, "")], [1])
    finally:
        del generator._sample
    embeds = conditioning["prompt_embeds"]
    assert embeds.shape == (1, 77, 32 + 48)

    def manual(tokenizer, encoder, text):
        ids = tokenizer(
            [text], padding="max_length", max_length=77, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return encoder(ids, output_hidden_states=True)

    plain = "a red dress"
    out_l = manual(pipe.tokenizer, pipe.text_encoder, plain)
    out_g = manual(pipe.tokenizer_2, pipe.text_encoder_2, plain)
    assert torch.allclose(conditioning["pooled_prompt_embeds"], out_g.text_embeds)
    # Emphasis scales each encoder's tokens and restores each encoder's mean.
    weights = [tokenize_prompt(prompt, generator._vocabs[0]).chunks[0].weights]
    assert 1 <= sum(w != 1.0 for w in weights[0]) < 10  # "red": a few tokens
    expected = torch.cat(
        [
            apply_emphasis(out_l.hidden_states[-2], weights),
            apply_emphasis(out_g.hidden_states[-2], weights),
        ],
        dim=-1,
    )
    assert torch.allclose(embeds, expected, atol=1e-5)
    # The empty negative prompt is encoded, not zeroed (WebUI, not diffusers).
    negative = conditioning["negative_prompt_embeds"]
    assert negative.abs().sum() > 0
    empty = manual(pipe.tokenizer, pipe.text_encoder, "").hidden_states[-2]
    assert torch.allclose(negative[..., :32], empty)

    # The WebUI leaves SDXL at the penultimate layer for CLIP skip 1 and 2 alike.
    (one,) = make_generator(smoke_dir, clip_skip=1).generate([spec(0)], [3])
    (two,) = make_generator(smoke_dir, clip_skip=2).generate([spec(0)], [3])
    assert np.array_equal(pixels(one), pixels(two))


def test_sdxl_long_weighted_prompt(generator, monkeypatch):
    calls = []

    def spy(encoder, prompts, clip_skip, **kwargs):
        calls.append((type(encoder).__name__, [len(p) for p in prompts], kwargs))
        return encode_chunks(encoder, prompts, clip_skip, **kwargs)

    monkeypatch.setattr(diffusers_generator, "encode_chunks", spy)
    prompt = "(the:1.3) " + "the " * 119  # 120 tokens: two chunks for each encoder
    (candidate,) = generator.generate([spec(0, prompt, "sdxl blur")], [1])
    assert candidate.image.size == (64, 96)
    assert "prompt: 120 tokens in 2 chunks; weights applied" in candidate.warnings
    assert "negative prompt: padded with 1 empty chunk(s) to 2" in candidate.warnings
    names = [name for name, _, _ in calls]
    assert names == ["CLIPTextModel", "CLIPTextModelWithProjection"] * 2
    assert all(counts == [2] for _, counts, _ in calls)
    assert all(kw["final_layer_norm"] is False for _, _, kw in calls)


def test_sdxl_size_conditioning_per_pass(smoke_dir, monkeypatch):
    """add_time_ids carry the base size, then the hires size, for both prompts."""
    hires = {
        "enabled": True,
        "upscaler": "R-ESRGAN 4x+",
        "scale": 1.5,
        "steps": 2,
        "denoise": 0.5,
    }
    gen = make_generator(
        smoke_dir, hires=hires, upscaler_model=str(smoke_dir / "esrgan" / ESRGAN_FILE)
    )
    pipe = gen.load()
    seen = []
    real_forward = pipe.unet.forward

    def spy(*args, added_cond_kwargs=None, **kwargs):
        seen.append(added_cond_kwargs["time_ids"].tolist())
        return real_forward(*args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    first, again = gen.generate([spec(0), spec(1)], [5, 5])
    assert first.image.size == (96, 144)
    assert np.array_equal(pixels(first), pixels(again))
    base = [96.0, 64.0, 0.0, 0.0, 96.0, 64.0]
    upscaled = [144.0, 96.0, 0.0, 0.0, 144.0, 96.0]
    # One item a call (batch_size 1), with classifier-free guidance: two rows.
    assert seen[0] == [base] * 2
    assert seen[-1] == [upscaled] * 2
    assert {str(rows) for rows in seen} == {str([base] * 2), str([upscaled] * 2)}
    gen.close()


def test_sdxl_latent_hires(smoke_dir):
    hires = {"enabled": True, "upscaler": "latent", "scale": 2.0, "denoise": 0.6}
    gen = make_generator(smoke_dir, hires=hires, sampler="DPM++ 2M SDE Karras")
    (candidate,) = gen.generate([spec(0)], [9])
    assert candidate.image.size == (128, 192)
    assert type(gen._img2img).__name__ == "StableDiffusionXLImg2ImgPipeline"
    gen.close()


def test_single_file_with_an_sdxl_config_loads_as_sdxl(smoke_dir):
    """The config folder decides the family; a file that does not fit it is a
    config error that says which family was tried (no hub is asked)."""
    from chatroom.errors import ConfigError

    gen = make_generator(
        smoke_dir,
        model=str(smoke_dir / "sd15.safetensors"),
        config=str(smoke_dir / "sdxl"),
    )
    with pytest.raises(ConfigError, match="as an SDXL checkpoint"):
        gen.load()


def test_sdxl_float16_decodes_in_float32_as_its_vae_asks(smoke_dir, monkeypatch):
    import torch

    gen = make_generator(smoke_dir, dtype="float16")
    gen.load()
    assert gen._pipe.vae.config.force_upcast
    dtypes = []
    real_decode = gen._decode

    def spy(latents, vae):
        dtypes.append(vae.dtype)
        return real_decode(latents, vae)

    monkeypatch.setattr(gen, "_decode", spy)
    (candidate,) = gen.generate([spec(0)], [4])
    assert dtypes == [torch.float32]  # one decode, straight in float32
    assert candidate.warnings == [] and candidate.image.size == (64, 96)
    assert gen._pipe.unet.dtype == torch.float16
    gen.close()


def test_sdxl_refiner_without_clip_l_is_refused(smoke_dir, tmp_path):
    import json
    import shutil

    from chatroom.errors import ConfigError

    folder = tmp_path / "refiner"
    shutil.copytree(smoke_dir / "sdxl", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder"] = index["tokenizer"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="no CLIP-L text encoder"):
        make_generator(smoke_dir, model=str(folder)).load()


def test_sdxl_batch_equals_singles(smoke_dir, generator):
    long = "the " * 100 + "(coat:1.3)"  # two chunks: its own group
    batched = make_generator(smoke_dir, batch_size=3)
    trio = batched.generate([spec(0), spec(1, long), spec(2)], [11, 12, 13])
    singles = [
        generator.generate([spec(0)], [11])[0],
        generator.generate([spec(1, long)], [12])[0],
        generator.generate([spec(2)], [13])[0],
    ]
    for together, alone in zip(trio, singles, strict=True):
        # Same noise per item; only CPU rounding of batched kernels may differ.
        diff = np.abs(pixels(together) - pixels(alone))
        assert diff.max() <= 2 and diff.mean() < 0.05
    batched.close()


def test_pad_after_end_puts_padding_after_the_first_eos():
    from chatroom.plugins.prompt_weighting import Chunk, pad_after_end

    chunk = Chunk([1, 7, 8, 2, 2, 2], [1.0, 1.2, 1.0, 1.0, 1.0, 1.0])
    assert pad_after_end(chunk, eos=2, pad=0).ids == [1, 7, 8, 2, 0, 0]
    assert pad_after_end(chunk, eos=2, pad=0).weights == chunk.weights
    assert pad_after_end(chunk, eos=2, pad=2) is chunk  # SD 1.x: EOS is the pad
