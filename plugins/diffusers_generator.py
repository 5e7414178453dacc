"""Generate images locally with diffusers: SD 1.5 folders and single-file checkpoints.

The prompts are encoded here, from the text encoder's hidden states, so that CLIP skip
means what it means in the WebUI (1 = last layer, 2 = penultimate, then the final
layer norm) and applies to the positive and the negative prompt alike. diffusers' own
``clip_skip`` is off by one against the WebUI, touches the positive prompt only, and
fails with transformers 5.6 and newer.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from chatroom.components import Context, Generator, Options
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Candidate, GenerationSettings, HiresSettings, PromptSpec

log = logging.getLogger(__name__)

# WebUI sampler name -> (diffusers scheduler class, options for it). LMS is left out:
# diffusers needs scipy for it, which no extra installs.
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DPM++ 2M SDE Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False},
    ),
    "DPM++ 2M Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM++ 2M": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False},
    ),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
# Upscalers that work without extra weights. The WebUI's ESRGAN family needs them.
UPSCALERS = ("latent", "lanczos")
# WebUI emphasis syntax, which encode_prompts does not apply yet.
WEIGHTED = re.compile(r"\([^()]*:\s*[0-9.]+\s*\)")
# SD 1.x's noise schedule; WebUI samplers always use it for these checkpoints.
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class DiffusersOptions(Options):
    model: str = Field(
        "",
        description="A diffusers folder or a single-file .safetensors checkpoint, "
        "e.g. majicmixRealistic_v6.safetensors.",
    )
    config: str = Field(
        "",
        description="For a single-file checkpoint: a local diffusers folder with the "
        "matching configs and tokenizer (model_index.json, unet/config.json, ...).",
    )
    sampler: str = "DPM++ 2M SDE Karras"
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(7.0, ge=0)
    width: int = Field(512, ge=8)
    height: int = Field(768, ge=8)
    clip_skip: int = Field(1, ge=1, description="WebUI meaning: 1 = last layer.")
    hires: HiresSettings = Field(default_factory=HiresSettings)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16"] = "auto"
    batch_size: int = Field(1, ge=1)
    local_files_only: bool = True

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str) -> str:
        if value not in SAMPLERS:
            known = ", ".join(repr(name) for name in SAMPLERS)
            raise ValueError(f"unknown sampler {value!r}; known samplers: {known}")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"{value} is not a multiple of 8")
        return value


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: base size times scale, rounded to a multiple of 8."""
    return (
        max(8, int(round(width * scale / 8)) * 8),
        max(8, int(round(height * scale / 8)) * 8),
    )


def encode_prompts(
    tokenizer, text_encoder, prompts: list[str], clip_skip: int
) -> tuple[Any, list[str | None], list[bool]]:
    """CLIP-encode prompts the WebUI way; return embeddings, received text, truncation.

    CLIP skip ``n`` takes the output of the ``n``-th layer from the end and applies
    the final layer norm, as the WebUI does; ``n = 1`` is the ordinary last hidden
    state. Prompts longer than the tokenizer's window are truncated; the received
    text is what survived, cut from the original at a token boundary.
    """
    import torch

    # TODO: WebUI emphasis ("(word:1.2)") and 75-token chunks; until then prompts
    # are encoded as plain text and anything past one window is cut off.
    limit = tokenizer.model_max_length
    received: list[str | None] = []
    truncated: list[bool] = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
        if len(ids) <= limit - 2:
            received.append(prompt)
            truncated.append(False)
            continue
        truncated.append(True)
        received.append(_kept_text(tokenizer, prompt, limit - 2))

    batch = tokenizer(
        prompts,
        padding="max_length",
        max_length=limit,
        truncation=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    with torch.no_grad():
        out = text_encoder(batch.input_ids.to(device), output_hidden_states=True)
        if clip_skip <= 1:
            embeds = out.last_hidden_state
        else:
            hidden = out.hidden_states[-clip_skip]
            # transformers 5 dropped the ``text_model`` wrapper of CLIPTextModel.
            inner = getattr(text_encoder, "text_model", text_encoder)
            embeds = inner.final_layer_norm(hidden)
    return embeds, received, truncated


def _kept_text(tokenizer, prompt: str, keep: int) -> str:
    """The part of ``prompt`` that fits in ``keep`` tokens."""
    try:
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        end = enc["offset_mapping"][keep - 1][1]
        return prompt[:end]
    except (NotImplementedError, KeyError, IndexError, TypeError):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids[:keep]
        return tokenizer.decode(ids)


class DiffusersGenerator(Generator):
    """Stable Diffusion through diffusers, WebUI-compatible samplers and CLIP skip."""

    name = "diffusers"
    description = (
        "Local Stable Diffusion 1.x through diffusers (folder or single file)."
    )
    Options = DiffusersOptions

    def __init__(self, options: DiffusersOptions, context: Context):
        super().__init__(options, context)
        if not options.model:
            raise ConfigError(
                "generator (diffusers): set generator.model to a checkpoint path, "
                "e.g. a diffusers folder or majicmixRealistic_v6.safetensors"
            )
        hires = options.hires
        if hires.enabled and not (0 < hires.denoise <= 1 and hires.scale > 0):
            raise ConfigError(
                "generator (diffusers): hires needs 0 < denoise <= 1 and scale > 0, "
                f"got denoise={hires.denoise}, scale={hires.scale}"
            )
        if hires.enabled and hires.upscaler.lower() not in UPSCALERS:
            raise ConfigError(
                f"generator (diffusers): hires upscaler {hires.upscaler!r} needs "
                "upscaler weights, which this generator does not support yet; "
                "use generator.hires.upscaler = 'lanczos' or 'latent'"
            )
        self.batch_size = options.batch_size
        self._pipe = None
        self._img2img = None
        self._sha256: str | None = None

    # --- loading -------------------------------------------------------------------

    def _torch_setup(self) -> tuple[str, Any]:
        import torch

        device = self.options.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.options.dtype
        if dtype == "auto":
            dtype = "float16" if device == "cuda" else "float32"
        return device, getattr(torch, dtype)

    def load(self):
        """Load the pipeline once; later calls return it."""
        if self._pipe is not None:
            return self._pipe
        try:
            import diffusers  # noqa: F401
            import torch  # noqa: F401
        except ImportError as exc:
            raise MissingDependency(
                exc.name or "diffusers", "diffusers", "generator 'diffusers'"
            ) from None
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
        path = Path(self.options.model).expanduser()
        device, dtype = self._torch_setup()
        started = time.perf_counter()
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path),
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=self.options.local_files_only,
                **_dtype_kwarg(dtype),
            )
        elif path.is_file():
            pipe = StableDiffusionPipeline.from_single_file(
                str(path),
                config=self._single_file_config(path),
                safety_checker=None,
                requires_safety_checker=False,
                local_files_only=self.options.local_files_only,
                **_dtype_kwarg(dtype),
            )
        else:
            raise ConfigError(
                f"generator (diffusers): model {str(path)!r} does not exist; set "
                "generator.model to a diffusers folder or a .safetensors checkpoint"
            )
        pipe.scheduler = make_scheduler(self.options.sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        self._pipe = pipe
        self._img2img = StableDiffusionImg2ImgPipeline(
            **pipe.components, requires_safety_checker=False
        )
        self._img2img.set_progress_bar_config(disable=True)
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            path,
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        return pipe

    def _single_file_config(self, path: Path) -> str:
        config = self.options.config
        if not config:
            raise ConfigError(
                f"generator (diffusers): single-file checkpoint {path.name} needs "
                "generator.config: a local diffusers folder with the matching configs "
                "and tokenizer (model_index.json, unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/; weights not needed), e.g. a copy of "
                "stable-diffusion-v1-5 for SD 1.5 checkpoints; no model hub is asked"
            )
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ConfigError(
                f"generator (diffusers): generator.config {config!r} is not a "
                "diffusers folder (no model_index.json)"
            )
        return str(folder)

    # --- generation ----------------------------------------------------------------

    def generate(self, specs: list[PromptSpec], seeds: list[int]) -> list[Candidate]:
        if len(specs) != len(seeds):
            raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
        if not specs:
            return []
        self.load()
        out: list[Candidate] = []
        size = self.options.batch_size
        for start in range(0, len(specs), size):
            out.extend(
                self._generate_batch(
                    specs[start : start + size], seeds[start : start + size]
                )
            )
        return out

    def _generate_batch(self, specs: list[PromptSpec], seeds: list[int]):
        import torch

        opts = self.options
        pipe = self._pipe
        started = time.perf_counter()

        prompt_embeds, received, truncated = encode_prompts(
            pipe.tokenizer, pipe.text_encoder, [s.prompt for s in specs], opts.clip_skip
        )
        negative_embeds, _, negative_truncated = encode_prompts(
            pipe.tokenizer,
            pipe.text_encoder,
            [s.negative_prompt for s in specs],
            opts.clip_skip,
        )

        # One CPU generator an item: the same seed gives the same image on any
        # device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = {
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_embeds,
            "guidance_scale": opts.cfg_scale,
            "generator": generators,
        }
        hires = opts.hires
        if not hires.enabled:
            images = pipe(
                width=opts.width,
                height=opts.height,
                num_inference_steps=opts.steps,
                output_type="pil",
                **common,
            ).images
        else:
            images = self._hires(common)
        elapsed = time.perf_counter() - started

        settings = GenerationSettings(
            model=opts.model,
            sampler=opts.sampler,
            steps=opts.steps,
            cfg_scale=opts.cfg_scale,
            width=opts.width,
            height=opts.height,
            clip_skip=opts.clip_skip,
            hires=hires,
        )
        limit = pipe.tokenizer.model_max_length - 2
        candidates = []
        for i, spec in enumerate(specs):
            warnings = []
            if truncated[i]:
                warnings.append(
                    f"prompt longer than {limit} tokens: truncated; the model "
                    "received only received_prompt"
                )
            if negative_truncated[i]:
                warnings.append(
                    f"negative prompt longer than {limit} tokens: truncated"
                )
            if WEIGHTED.search(spec.prompt) or WEIGHTED.search(spec.negative_prompt):
                warnings.append(
                    "prompt weighting like (word:1.2) is not applied yet: the "
                    "brackets and weights were encoded as plain text"
                )
            candidates.append(
                Candidate(
                    index=spec.index,
                    item_id=spec.item_id,
                    spec=spec,
                    settings=settings.model_copy(
                        deep=True, update={"seed": int(seeds[i])}
                    ),
                    image=images[i],
                    timings={"generate": elapsed / len(specs)},
                    received_prompt=received[i],
                    warnings=warnings,
                )
            )
        return candidates

    def _hires(self, common: dict[str, Any]):
        """Hires fix: a base pass, an upscale, then img2img at the larger size."""
        import torch

        opts = self.options
        hires = opts.hires
        width, height = hires_size(opts.width, opts.height, hires.scale)
        base_output = "latent" if hires.upscaler.lower() == "latent" else "pil"
        base = self._pipe(
            width=opts.width,
            height=opts.height,
            num_inference_steps=opts.steps,
            output_type=base_output,
            **common,
        ).images
        if base_output == "latent":
            factor = self._pipe.vae_scale_factor
            upscaled = torch.nn.functional.interpolate(
                base, size=(height // factor, width // factor), mode="bilinear"
            )
        else:
            from PIL import Image

            upscaled = [im.resize((width, height), Image.LANCZOS) for im in base]
        # WebUI's hires steps: 0 means "as many as the first pass".
        steps = hires.steps or opts.steps
        return self._img2img(
            image=upscaled,
            strength=hires.denoise,
            num_inference_steps=max(steps, math.ceil(1 / max(hires.denoise, 1e-3))),
            output_type="pil",
            **common,
        ).images

    # --- bookkeeping ---------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        try:
            import diffusers

            version = diffusers.__version__
        except ImportError:
            version = None
        return {
            "model": self.options.model,
            "sha256": self.model_sha256(),
            "diffusers": version,
            "sampler": self.options.sampler,
        }

    def model_sha256(self) -> str | None:
        """sha256 of the checkpoint file, or of model_index.json for a folder."""
        if self._sha256 is None:
            path = Path(self.options.model).expanduser()
            target = path / "model_index.json" if path.is_dir() else path
            if not target.is_file():
                return None
            digest = hashlib.sha256()
            with target.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    def close(self) -> None:
        if self._pipe is None:
            return
        device = self._pipe.device
        self._pipe = None
        self._img2img = None
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _dtype_kwarg(dtype) -> dict[str, Any]:
    """diffusers 0.42 renamed ``torch_dtype`` to ``dtype`` and warns on the old name."""
    import diffusers

    major, minor = (int(p) for p in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 42) else {"torch_dtype": dtype}


def make_scheduler(sampler: str, base_config):
    """The diffusers scheduler for a WebUI sampler name, on SD's beta schedule."""
    import diffusers

    class_name, extra = SAMPLERS[sampler]
    scheduler_cls = getattr(diffusers, class_name)
    return scheduler_cls.from_config(dict(base_config), **SD_BETAS, **extra)


@hookimpl
def register_generators(register):
    register(DiffusersGenerator)
