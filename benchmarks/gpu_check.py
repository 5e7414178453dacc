"""A GPU check at the paper's settings, with random weights of the real architectures.

SD 1.5 (UNet, VAE and CLIP text encoder built from SD 1.5's real config dims) at
512x768, DPM++ 2M SDE Karras, 30 steps, CFG 4, CLIP skip 2, hires fix x2 with an
RRDBNet of RealESRGAN_x4plus's real size; seconds per image through chatroom's
DiffusersGenerator vs the same diffusers pipelines called directly.

    python benchmarks/gpu_check.py              # on a CUDA machine, float16
    python benchmarks/gpu_check.py --cpu-tiny   # tiny models on the CPU: a dry run

Prints one JSON object. Nothing is downloaded: the models are written to a
temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

log = logging.getLogger("gpu_check")

PROMPT = (
    "(best quality:1.2), photo of a young woman in a red silk dress, long sleeves, "
    "full body, standing, plain white background, studio lighting, looking at camera"
)
NEGATIVE = "(worst quality, low quality:1.4), lowres, blurry, watermark, text"

# SD 1.5's UNet and VAE configs (v1-inference.yaml in diffusers terms).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}
SD15_CLIP = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}


def write_models(folder: Path, tiny: bool) -> tuple[Path, Path]:
    """An SD 1.5 folder and an x4 RRDBNet; tiny means the smoke models."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from chatroom import smoke

    if tiny:
        smoke.write_smoke_models(folder)
        return folder / "sd15", folder / "esrgan" / smoke.ESRGAN_FILE

    torch.manual_seed(0)
    sd15 = folder / "sd15"
    # No real CLIP vocabulary offline: the smoke tokenizer's ids fit the real table.
    smoke._clip_vocab(sd15 / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(sd15 / "tokenizer"))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **SD15_CLIP,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DPMSolverMultistepScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(str(sd15), safe_serialization=True)
    esrgan = folder / "RealESRGAN_x4plus-random.safetensors"
    save_file(smoke.esrgan_state_dict(num_feat=64, num_grow=32, num_blocks=23), esrgan)
    return sd15, esrgan


def settings(tiny: bool) -> dict:
    if tiny:
        return {"width": 64, "height": 96, "steps": 2, "hires_steps": 2}
    return {"width": 512, "height": 768, "steps": 30, "hires_steps": 15}


def through_chatroom(sd15, esrgan, s, device, dtype, images) -> float:
    from chatroom.components import Context, validate_options
    from chatroom.models import PromptSpec
    from chatroom.plugins.diffusers_generator import DiffusersGenerator

    raw = {
        "model": str(sd15),
        "sampler": "DPM++ 2M SDE Karras",
        "steps": s["steps"],
        "cfg_scale": 4.0,
        "width": s["width"],
        "height": s["height"],
        "clip_skip": 2,
        "device": device,
        "dtype": dtype,
        "upscaler_model": str(esrgan),
        "hires": {
            "enabled": True,
            "upscaler": "R-ESRGAN 4x+",
            "scale": 2.0,
            "steps": s["hires_steps"],
            "denoise": 0.4,
        },
    }
    options = validate_options(DiffusersGenerator, "generator", raw)
    generator = DiffusersGenerator(options, Context(domain=None))
    spec = PromptSpec(index=0, item_id="x", prompt=PROMPT, negative_prompt=NEGATIVE)
    generator.generate([spec], [0])  # warm-up
    _sync(device)
    started = time.perf_counter()
    for seed in range(1, images + 1):
        (candidate,) = generator.generate([spec], [seed])
    _sync(device)
    elapsed = time.perf_counter() - started
    log.info("chatroom image %s, warnings %s", candidate.image.size, candidate.warnings)
    generator.close()
    return elapsed / images


def direct(sd15, esrgan, s, device, dtype, images) -> float:
    import numpy as np
    import torch
    from diffusers import (
        DPMSolverMultistepScheduler,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionPipeline,
    )
    from PIL import Image
    from safetensors.torch import load_file
    from spandrel import ModelLoader

    torch_dtype = getattr(torch, dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(sd15), safety_checker=None, local_files_only=True, dtype=torch_dtype
    ).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
    )
    pipe.set_progress_bar_config(disable=True)
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    upscaler = ModelLoader().load_from_state_dict(load_file(str(esrgan))).to(device)
    if dtype == "float16":
        upscaler.half()
    upscaler.eval()
    width, height = s["width"] * 2, s["height"] * 2

    def one(seed: int):
        generator = torch.Generator("cpu").manual_seed(seed)
        common = {
            "prompt": PROMPT,
            "negative_prompt": NEGATIVE,
            "guidance_scale": 4.0,
            "clip_skip": 1,  # diffusers' 1 = WebUI's CLIP skip 2
            "generator": generator,
        }
        try:
            base = pipe(
                width=s["width"],
                height=s["height"],
                num_inference_steps=s["steps"],
                **common,
            ).images[0]
        except Exception:  # diffusers 0.42 + transformers 5.6: clip_skip fails
            common.pop("clip_skip")
            base = pipe(
                width=s["width"],
                height=s["height"],
                num_inference_steps=s["steps"],
                **common,
            ).images[0]
        tensor = torch.from_numpy(np.array(base)).permute(2, 0, 1)
        tensor = (tensor[None].float() / 255).to(device=device, dtype=torch_dtype)
        big = upscaler(tensor)[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        up = Image.fromarray((big * 255).round().astype("uint8"))
        up = up.resize((width, height), Image.LANCZOS)
        return img2img(
            image=up,
            strength=0.4,
            num_inference_steps=max(s["hires_steps"], 3),
            **common,
        ).images[0]

    one(0)
    _sync(device)
    started = time.perf_counter()
    for seed in range(1, images + 1):
        one(seed)
    _sync(device)
    return (time.perf_counter() - started) / images


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-tiny", action="store_true", help="tiny models, CPU")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--models", help="reuse or write the models here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    import torch

    tiny = args.cpu_tiny
    device = "cpu" if tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --cpu-tiny for a dry run")
    dtype = "float32" if tiny else "float16"
    folder = Path(args.models or tempfile.mkdtemp(prefix="chatroom-gpu-check-"))
    started = time.perf_counter()
    if (folder / "sd15" / "model_index.json").is_file():
        sd15 = folder / "sd15"
        esrgan = next(folder.rglob("RealESRGAN_x4plus*.safetensors"))
    else:
        sd15, esrgan = write_models(folder, tiny)
    written = time.perf_counter() - started
    s = settings(tiny)

    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": dtype,
        "size": f"{s['width']}x{s['height']} -> x2",
        "steps": s["steps"],
        "hires_steps": s["hires_steps"],
        "images": args.images,
        "models_written_s": round(written, 1),
        "seconds_per_image": {
            "chatroom": round(
                through_chatroom(sd15, esrgan, s, device, dtype, args.images), 3
            ),
            "diffusers": round(direct(sd15, esrgan, s, device, dtype, args.images), 3),
        },
    }
    if device == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    per = result["seconds_per_image"]
    result["chatroom_overhead"] = round(per["chatroom"] / per["diffusers"] - 1, 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
