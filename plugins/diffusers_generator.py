"""Generate images locally with diffusers: SD 1.x and SDXL, folders or single files.

The prompts are encoded here, the WebUI's way (see ``prompt_weighting``): emphasis
like ``(term:1.2)``, prompts of any length in 75-token chunks, and CLIP skip as the
WebUI means it (1 = last layer, 2 = penultimate, then the final layer norm) for the
positive and the negative prompt alike. diffusers' own ``clip_skip`` is off by one
against the WebUI, touches the positive prompt only, and fails with transformers 5.6
and newer.

SDXL reads the prompt with both of its text encoders, as the WebUI does: each
encoder's penultimate hidden state (no final layer norm), CLIP-L's and OpenCLIP
bigG's side by side, and the pooled output of bigG's first chunk. The WebUI ignores
CLIP skip for SDXL by default; here skip 1 and 2 both mean that default, and a
larger skip moves CLIP-L's layer only (the WebUI's "CLIP skip for SDXL CLIP-L"
setting). The size conditioning (``add_time_ids``) is each pass's own size.

Checkpoints load from ``.safetensors``; pickled files (``.ckpt``, ``.pt``, ``.bin``)
can run code when loaded, so they need ``allow_pickle = true`` and are then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from chatroom.components import Context, Generator, Options
from chatroom.errors import ChatroomError, ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Candidate, GenerationSettings, HiresSettings, PromptSpec

from . import civitai
from . import prompt_weighting as pw
from .weights import device_and_dtype

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
# Upscalers that need no weights; any other name (the WebUI's "R-ESRGAN 4x+",
# "4x-UltraSharp", ...) is a model file given by ``upscaler_model``.
UPSCALERS = ("latent", "lanczos")
# SD 1.x's noise schedule; WebUI samplers always use it for these checkpoints.
# Ends the note of an image the VAE could not decode; such a candidate is rejected.
BLACK_NOTE = "returned black"
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
PICKLED = (".ckpt", ".pt", ".pth", ".bin")
# How many encoded prompts a generator keeps: the negative prompt rarely changes
# within a run, so it is encoded once.
ENCODED_CACHE = 16


class DiffusersOptions(Options):
    model: str = Field(
        "",
        description="A diffusers folder, a single-file .safetensors checkpoint "
        "(e.g. majicmixRealistic_v6.safetensors), a Hugging Face Hub id "
        "(org/name) or civitai:VERSION_ID, a Civitai model version (docs/models.md).",
    )
    config: str = Field(
        "",
        description="For a single-file checkpoint: a local diffusers folder with the "
        "matching configs and tokenizer (model_index.json, unet/config.json, ...).",
    )
    allow_pickle: bool = Field(
        False,
        description="Load pickled checkpoints (.ckpt, .pt, .pth, .bin), which can "
        "run code; they are read with torch.load(weights_only=True). Prefer "
        ".safetensors.",
    )
    sampler: str = "DPM++ 2M SDE Karras"
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(7.0, ge=0)
    width: int = Field(512, ge=8)
    height: int = Field(768, ge=8)
    clip_skip: int = Field(1, ge=1, description="WebUI meaning: 1 = last layer.")
    hires: HiresSettings = Field(default_factory=HiresSettings)
    upscaler_model: str = Field(
        "",
        description="The weights of hires.upscaler when it is a model (ESRGAN, "
        "Real-ESRGAN, ...), e.g. RealESRGAN_x4plus.safetensors; any architecture "
        "spandrel reads.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16"] = "auto"
    batch_size: int = Field(1, ge=1)
    threads: int = Field(
        0,
        ge=0,
        description="torch CPU threads (0: torch's default). CPU results depend on "
        "it: pin it for byte-identical images across machines.",
    )
    local_files_only: bool = Field(
        True,
        description="For a Hugging Face Hub id: load only what is already in the "
        "Hub cache; false lets diffusers download it.",
    )
    civitai_cache_dir: str = Field(
        civitai.DEFAULT_CACHE,
        description="Where civitai:VERSION_ID checkpoints are downloaded.",
    )
    civitai_base_url: str = Field(
        civitai.BASE_URL, description="The Civitai server civitai: models come from."
    )
    civitai_key_env: str = Field(
        civitai.TOKEN_ENV,
        description="The environment variable holding the Civitai API key.",
    )

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


def _unusable(notes: list[str]) -> str | None:
    """The decode note of an image that stayed NaN or black, which must not be kept."""
    return next((n for n in notes if n.endswith(BLACK_NOTE)), None)


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The second pass's size: base size times scale, rounded to a multiple of 8."""
    return (
        max(8, int(round(width * scale / 8)) * 8),
        max(8, int(round(height * scale / 8)) * 8),
    )


# --- prompts -------------------------------------------------------------------------


def vocabulary(tokenizer, pad: int | None = None) -> pw.Vocabulary:
    """What chunking needs from a CLIP tokenizer; ``pad`` replaces its padding."""

    def tokenize(texts):
        return tokenizer(list(texts), add_special_tokens=False, verbose=False).input_ids

    comma = tokenize([","])[0]
    return pw.Vocabulary(
        tokenize=tokenize,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=tokenizer.pad_token_id if pad is None else pad,
        comma=comma[-1] if comma else None,
    )


def encode_chunks(
    text_encoder,
    prompts: list[list[pw.Chunk]],
    clip_skip: int,
    *,
    final_layer_norm: bool = True,
    pooled: bool = False,
):
    """Encode prompts of equal chunk counts: ``(prompts, 77 * chunks, dim)``.

    Each chunk goes through the text encoder on its own; CLIP skip ``n`` takes the
    ``n``-th hidden state from the end and applies the final layer norm, as the
    WebUI does for SD 1.x (``n = 1`` is the ordinary last hidden state). SDXL's
    encoders skip the norm (``final_layer_norm=False``). Then the emphasis weights
    scale the token embeddings and the chunk's mean is restored.

    With ``pooled``, also returns each prompt's pooled output ``(prompts, dim)``
    from its first chunk, before emphasis (the WebUI's SDXL ``pooled``).
    """
    import torch

    counts = {len(chunks) for chunks in prompts}
    if len(counts) != 1:
        raise ValueError(f"prompts of different chunk counts: {sorted(counts)}")
    flat = [chunk for chunks in prompts for chunk in chunks]
    device = text_encoder.device
    ids = torch.tensor([c.ids for c in flat], device=device)
    with torch.no_grad():
        # Hidden states are only collected when a layer other than the last is read.
        hidden = clip_skip > 1 or not final_layer_norm
        out = text_encoder(ids, output_hidden_states=hidden)
        if clip_skip <= 1 and final_layer_norm:
            embeds = out.last_hidden_state
        elif final_layer_norm:
            # transformers 5 dropped the ``text_model`` wrapper of CLIPTextModel.
            inner = getattr(text_encoder, "text_model", text_encoder)
            embeds = inner.final_layer_norm(out.hidden_states[-clip_skip])
        else:
            embeds = out.hidden_states[-clip_skip]
        if any(w != 1.0 for c in flat for w in c.weights):
            embeds = pw.apply_emphasis(embeds, [c.weights for c in flat])
    embeds = embeds.reshape(len(prompts), -1, embeds.shape[-1])
    if not pooled:
        return embeds
    first = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    per_prompt = len(flat) // len(prompts)
    return embeds, first[::per_prompt]


def encode_prompts(tokenizer, text_encoder, prompts: list[str], clip_skip: int):
    """Tokenize and encode prompts, padded to the longest's chunk count.

    Returns the embeddings and each prompt's :class:`TokenizedPrompt`.
    """
    vocab = vocabulary(tokenizer)
    tokenized = [pw.tokenize_prompt(p, vocab) for p in prompts]
    count = max(len(t.chunks) for t in tokenized)
    empty = pw.tokenize_prompt("", vocab).chunks[0]
    padded = [t.padded(count, empty) for t in tokenized]
    return encode_chunks(text_encoder, padded, clip_skip), tokenized


class _Prompts:
    """One item's positive and negative prompt, chunked, and what to say about it.

    ``vocabs`` holds one vocabulary a text encoder (two for SDXL); ``positive`` and
    ``negative`` are the first's tokenization, ``positives`` and ``negatives`` all.
    """

    def __init__(self, spec: PromptSpec, vocabs: list[pw.Vocabulary], tokenize=None):
        tokenize = tokenize or pw.tokenize_prompt
        self.notes: list[str] = []
        prompt = self._prepare("prompt", spec.prompt)
        negative = self._prepare("negative prompt", spec.negative_prompt)
        self.positives = [tokenize(prompt, vocab) for vocab in vocabs]
        self.negatives = [tokenize(negative, vocab) for vocab in vocabs]
        self.positive, self.negative = self.positives[0], self.negatives[0]
        self.chunks = max(len(t.chunks) for t in (*self.positives, *self.negatives))
        for label, tokenized in (
            ("prompt", self.positive),
            ("negative prompt", self.negative),
        ):
            line = pw.describe(label, tokenized)
            missing = self.chunks - len(tokenized.chunks)
            if missing:
                padding = f"padded with {missing} empty chunk(s) to {self.chunks}"
                line = f"{line}; {padding}" if line else f"{label}: {padding}"
            if line:
                self.notes.append(line)

    def _prepare(self, label: str, text: str) -> str:
        text, tags = pw.strip_extra_networks(text)
        if tags:
            self.notes.append(
                f"{label}: extra networks are not supported and were removed: "
                + " ".join(tags)
            )
        for feature in pw.unsupported_syntax(text):
            self.notes.append(f"{label}: {feature} is not supported: encoded as text")
        return text


# --- the generator -------------------------------------------------------------------


class DiffusersGenerator(Generator):
    """Stable Diffusion through diffusers, WebUI-compatible prompts and samplers."""

    requires = (
        ("torch", "chatroom[diffusers]"),
        ("diffusers", "chatroom[diffusers]"),
        ("spandrel", "chatroom[diffusers]"),
    )

    name = "diffusers"
    description = (
        "Local Stable Diffusion 1.x and SDXL through diffusers (folder or single file)."
    )
    Options = DiffusersOptions

    def __init__(self, options: DiffusersOptions, context: Context):
        super().__init__(options, context)
        if not options.model:
            raise ConfigError(
                "generator (diffusers): set generator.model to a checkpoint path, "
                "e.g. a diffusers folder or majicmixRealistic_v6.safetensors"
            )
        _check_local_model(options.model)
        hires = options.hires
        if hires.enabled and not (0 < hires.denoise <= 1 and hires.scale > 0):
            raise ConfigError(
                "generator (diffusers): hires needs 0 < denoise <= 1 and scale > 0, "
                f"got denoise={hires.denoise}, scale={hires.scale}"
            )
        if hires.enabled and not self._model_upscaler and options.upscaler_model:
            raise ConfigError(
                f"generator (diffusers): generator.upscaler_model is set but "
                f"hires.upscaler is {hires.upscaler!r}, which needs no weights; "
                "name the model's upscaler (e.g. 'R-ESRGAN 4x+') or unset "
                "upscaler_model"
            )
        if hires.enabled and self._model_upscaler and not options.upscaler_model:
            raise ConfigError(
                f"generator (diffusers): hires upscaler {hires.upscaler!r} needs "
                "its weights: set generator.upscaler_model to the file (e.g. "
                "RealESRGAN_x4plus.safetensors), or use generator.hires.upscaler = "
                "'lanczos' or 'latent'"
            )
        self.batch_size = options.batch_size
        self._pipe = None
        self._img2img = None
        self._upscaler = None
        self._vae32 = None
        self._sha256: str | None = None
        self._resolved: Path | None = None  # the local path load() found
        self._sdxl = False
        self._vocabs: list[pw.Vocabulary] = []
        self._empty: list[pw.Chunk] = []
        self._encoded: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._tokenized: OrderedDict[tuple, pw.TokenizedPrompt] = OrderedDict()

    @property
    def _model_upscaler(self) -> bool:
        return self.options.hires.upscaler.lower() not in UPSCALERS

    # --- loading ---------------------------------------------------------------------

    def _torch_setup(self) -> tuple[str, Any]:
        import torch

        device, dtype = device_and_dtype(self.options.device, self.options.dtype)
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
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
        from diffusers import (
            StableDiffusionImg2ImgPipeline,
            StableDiffusionPipeline,
            StableDiffusionXLImg2ImgPipeline,
            StableDiffusionXLPipeline,
        )

        if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
        path = resolve_model(self.options)
        self._resolved = path
        device, dtype = self._torch_setup()
        started = time.perf_counter()
        self._sdxl = is_sdxl(path, self.options.config)
        if self._sdxl:
            pipeline_cls, img2img_cls = (
                StableDiffusionXLPipeline,
                StableDiffusionXLImg2ImgPipeline,
            )
            # No invisible watermark: it would change pixels a dataset keeps.
            extra = {"add_watermarker": False}
            img2img_extra = {**extra, "requires_aesthetics_score": False}
        else:
            pipeline_cls, img2img_cls = (
                StableDiffusionPipeline,
                StableDiffusionImg2ImgPipeline,
            )
            extra = {"safety_checker": None, "requires_safety_checker": False}
            img2img_extra = {"requires_safety_checker": False}
        common = {
            **extra,
            "local_files_only": self.options.local_files_only,
            **_dtype_kwarg(dtype),
        }
        if path.is_dir():
            # None prefers .safetensors and falls back to pickled weights.
            safe = None if self.options.allow_pickle else True
            _check_local_model(str(path))
            try:
                pipe = pipeline_cls.from_pretrained(
                    str(path), use_safetensors=safe, **common
                )
            except Exception as exc:  # any unloadable folder is a setting to fix
                if isinstance(exc, OSError) and safe and "safetensors" in str(exc):
                    raise self._pickle_error(path) from None
                raise ConfigError(
                    f"generator (diffusers): generator.model {str(path)!r} does not "
                    f"load as a diffusers folder: {_first_line(exc)}"
                ) from None
        elif path.is_file():
            _check_local_model(str(path))
            if path.suffix.lower() in PICKLED and not self.options.allow_pickle:
                raise self._pickle_error(path)
            config = self._single_file_config(path)
            try:
                pipe = pipeline_cls.from_single_file(str(path), config=config, **common)
            except Exception as exc:  # a corrupt or foreign file: the setting is wrong
                raise ConfigError(
                    f"generator (diffusers): cannot load {path.name} "
                    f"(generator.model) as an {'SDXL' if self._sdxl else 'SD 1.x'} "
                    f"checkpoint with the configs in {config}: {_first_line(exc)}"
                ) from None
        else:
            raise ConfigError(
                f"generator (diffusers): model {str(path)!r} does not exist; set "
                "generator.model to a diffusers folder, a .safetensors checkpoint, "
                "a Hub id (org/name) or civitai:<modelVersionId>"
            )
        if self._sdxl and (pipe.text_encoder is None or pipe.tokenizer is None):
            raise ConfigError(
                f"generator (diffusers): {path.name} has no CLIP-L text encoder (an "
                "SDXL refiner?); only SDXL base models are supported"
            )
        pipe.scheduler = make_scheduler(self.options.sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        self._pipe = pipe
        self._img2img = img2img_cls(**pipe.components, **img2img_extra)
        self._vocabs = [vocabulary(pipe.tokenizer)]
        if self._sdxl:
            # Chunked with EOS as padding, then padded after the EOS (WebUI).
            self._vocabs.append(
                vocabulary(pipe.tokenizer_2, pad=pipe.tokenizer_2.eos_token_id)
            )
        self._empty = [pw.tokenize_prompt("", v).chunks[0] for v in self._vocabs]
        self._encoded.clear()
        self._tokenized.clear()
        self._img2img.set_progress_bar_config(disable=True)
        if self.options.hires.enabled and self._model_upscaler:
            from .upscalers import ModelUpscaler

            self._upscaler = ModelUpscaler(
                self.options.upscaler_model,
                allow_pickle=self.options.allow_pickle,
                device=device,
                dtype=dtype,
                option="generator.upscaler_model",
            )
            try:
                self._upscaler.load()
            except ChatroomError:
                raise
            except Exception as exc:  # an unreadable weights file
                raise ConfigError(
                    "generator (diffusers): generator.upscaler_model "
                    f"{self.options.upscaler_model!r} is not an upscaler's weights "
                    f"file: {_first_line(exc)}"
                ) from None
        log.info(
            "loaded %s on %s (%s) in %.1f s",
            path,
            device,
            str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )
        return pipe

    def _pickle_error(self, path: Path) -> ConfigError:
        return ConfigError(
            f"generator (diffusers): {path.name} is a pickled checkpoint (or a "
            "folder without .safetensors weights); pickles can run code when "
            "loaded. Convert it to .safetensors, or set generator.allow_pickle = "
            "true if you trust the file (it is then read with "
            "torch.load(weights_only=True))"
        )

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

    # --- generation ------------------------------------------------------------------

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
        opts = self.options
        started = time.perf_counter()
        prompts = [_Prompts(spec, self._vocabs, self._tokenize) for spec in specs]

        # Items of one chunk count run together: padding a prompt with empty chunks
        # to match another item's would change its image.
        images: list[Any] = [None] * len(specs)
        notes: list[list[str]] = [list(p.notes) for p in prompts]
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(prompts):
            groups.setdefault(item.chunks, []).append(i)
        encoders = range(len(self._vocabs))
        for count, members in groups.items():
            group = [prompts[i] for i in members]
            positive = self._encode(
                [[item.positives[k] for item in group] for k in encoders], count
            )
            negative = self._encode(
                [[item.negatives[k] for item in group] for k in encoders], count
            )
            conditioning = {
                "prompt_embeds": positive[0],
                "negative_prompt_embeds": negative[0],
            }
            if self._sdxl:
                conditioning["pooled_prompt_embeds"] = positive[1]
                conditioning["negative_pooled_prompt_embeds"] = negative[1]
            group_images, problems = self._sample(
                conditioning, [seeds[i] for i in members]
            )
            for i, image, problem in zip(members, group_images, problems, strict=True):
                images[i] = image
                notes[i].extend(problem)
        elapsed = time.perf_counter() - started

        settings = GenerationSettings(
            model=opts.model,
            sampler=opts.sampler,
            steps=opts.steps,
            cfg_scale=opts.cfg_scale,
            width=opts.width,
            height=opts.height,
            clip_skip=opts.clip_skip,
            hires=opts.hires,
        )
        return [
            Candidate(
                index=spec.index,
                item_id=spec.item_id,
                spec=spec,
                settings=settings.model_copy(deep=True, update={"seed": int(seed)}),
                image=image,
                timings={"generate": elapsed / len(specs)},
                received_prompt=item.positive.text,
                warnings=item_notes,
                rejected=_unusable(item_notes),
            )
            for spec, seed, image, item, item_notes in zip(
                specs, seeds, images, prompts, notes, strict=True
            )
        ]

    def _tokenize(self, text: str, vocab: pw.Vocabulary) -> pw.TokenizedPrompt:
        """``tokenize_prompt``, remembered: the negative prompt repeats every item."""
        key = (id(vocab), text)
        if key in self._tokenized:
            self._tokenized.move_to_end(key)
            return self._tokenized[key]
        tokenized = self._tokenized[key] = pw.tokenize_prompt(text, vocab)
        if len(self._tokenized) > ENCODED_CACHE:
            self._tokenized.popitem(last=False)
        return tokenized

    def _encode(self, tokenized: list[list[pw.TokenizedPrompt]], count: int):
        """Encode one side (positive or negative) of a group: ``(embeds, pooled)``.

        ``tokenized`` holds the group's prompts as each text encoder's tokenizer cut
        them (SD 1.x reads only the first). Results are kept for the next call with
        the same chunks, so a run's one negative prompt is encoded once.
        """
        padded = [
            [t.padded(count, empty) for t in prompts]
            for prompts, empty in zip(tokenized, self._empty, strict=True)
        ]
        key = (
            self.options.clip_skip,
            tuple(
                tuple((*c.ids, *c.weights) for c in chunks)
                for prompts in padded
                for chunks in prompts
            ),
        )
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key]
        if self._sdxl:
            encoded = self._encode_sdxl(padded)
        else:
            pipe = self._pipe
            encoded = (
                encode_chunks(pipe.text_encoder, padded[0], self.options.clip_skip),
                None,
            )
        self._encoded[key] = encoded
        if len(self._encoded) > ENCODED_CACHE:
            self._encoded.popitem(last=False)
        return encoded

    def _encode_sdxl(self, padded: list[list[list[pw.Chunk]]]):
        """CLIP-L's and bigG's penultimate layers side by side; bigG's pooled output."""
        import torch

        pipe = self._pipe
        # WebUI: CLIP skip leaves SDXL at the penultimate layer unless it asks for
        # more, and then only CLIP-L moves.
        skip = max(2, self.options.clip_skip)
        clip_l = encode_chunks(
            pipe.text_encoder, padded[0], skip, final_layer_norm=False
        )
        eos, pad = pipe.tokenizer_2.eos_token_id, pipe.tokenizer_2.pad_token_id
        repadded = [[pw.pad_after_end(c, eos, pad) for c in p] for p in padded[1]]
        big_g, pooled = encode_chunks(
            pipe.text_encoder_2, repadded, 2, final_layer_norm=False, pooled=True
        )
        return torch.cat([clip_l, big_g], dim=-1), pooled

    def _sample(self, conditioning: dict[str, Any], seeds: list[int]):
        """Run the passes for one group; return images and each one's problems."""
        import torch

        opts = self.options
        # One CPU generator an item: the same seed gives the same image on any
        # device and in any batch.
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        common = {
            **conditioning,
            "guidance_scale": opts.cfg_scale,
            "generator": generators,
        }
        base = self._pipe(
            width=opts.width,
            height=opts.height,
            num_inference_steps=opts.steps,
            output_type="latent",
            **common,
            **self._size_conditioning(opts.width, opts.height),
        ).images
        if not opts.hires.enabled:
            return self._decode_images(base)
        return self._hires(base, common)

    def _hires(self, base, common: dict[str, Any]):
        """Hires fix: upscale the base pass, then img2img at the larger size."""
        import torch

        opts = self.options
        hires = opts.hires
        width, height = hires_size(opts.width, opts.height, hires.scale)
        problems: list[list[str]] = [[] for _ in range(base.shape[0])]
        if hires.upscaler.lower() == "latent":
            factor = self._pipe.vae_scale_factor
            upscaled = torch.nn.functional.interpolate(
                base, size=(height // factor, width // factor), mode="bilinear"
            )
        else:
            from PIL import Image

            images, problems = self._decode_images(base)
            problems = [[f"hires base pass: {p}" for p in ps] for ps in problems]
            if self._upscaler is not None:
                upscaled = self._upscaler.upscale(images, (width, height))
            else:
                upscaled = [im.resize((width, height), Image.LANCZOS) for im in images]

        # WebUI's hires steps: 0 means "as many as the first pass".
        steps = hires.steps or opts.steps
        latents = self._img2img(
            image=upscaled,
            strength=hires.denoise,
            num_inference_steps=max(steps, math.ceil(1 / max(hires.denoise, 1e-3))),
            output_type="latent",
            **common,
            **self._size_conditioning(width, height),
        ).images
        images, final = self._decode_images(latents)
        return images, [a + b for a, b in zip(problems, final, strict=True)]

    def _size_conditioning(self, width: int, height: int) -> dict[str, Any]:
        """SDXL's ``add_time_ids``: the pass's own size, uncropped, as the WebUI."""
        if not self._sdxl:
            return {}
        size = (height, width)
        return {"original_size": size, "target_size": size}

    # --- decoding, with the WebUI's NaN guard ---------------------------------------

    def _decode(self, latents, vae):
        """Latents -> pixels in [-1, 1], unclamped (NaN stays NaN)."""
        import torch

        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=vae.device, dtype=vae.dtype)
        with torch.no_grad():
            return vae.decode(
                latents / vae.config.scaling_factor + shift, return_dict=False
            )[0]

    def _decode_images(self, latents):
        """Decode to PIL images; a NaN or black float16 decode is tried in float32.

        An image still bad then comes back black, with a note, so that the engine's
        image check rejects it; no exception is raised.
        """
        import torch

        vae = self._pipe.vae
        if self._sdxl and vae.dtype == torch.float16 and vae.config.force_upcast:
            # SDXL's VAE overflows in float16, as its config says: go to float32.
            vae = self._float32_vae()
        pixels = list(self._decode(latents, vae))
        bad = _bad_images(pixels)
        problems: list[list[str]] = [[] for _ in pixels]
        if bad and vae.dtype == torch.float16:
            rows = sorted(bad)
            log.warning("the float16 VAE gave NaN or black; decoding again in float32")
            retried = list(self._decode(latents[rows].float(), self._float32_vae()))
            still = _bad_images(retried)
            for j, row in enumerate(rows):
                pixels[row] = retried[j]
                if j in still:
                    problems[row].append(
                        f"image: {bad[row]} from the VAE in float16 and "
                        f"{still[j]} in float32; {BLACK_NOTE}"
                    )
                else:
                    problems[row].append(
                        f"image: {bad[row]} from the VAE in float16; decoded again "
                        "in float32"
                    )
            bad = {row: bad[row] for j, row in enumerate(rows) if j in still}
        else:
            for row, what in bad.items():
                problems[row].append(f"image: {what} from the VAE; {BLACK_NOTE}")

        images = []
        for row, image in enumerate(pixels):
            if row in bad:
                image = torch.full_like(image, -1.0)  # black, whatever NaN becomes
            processed = self._pipe.image_processor.postprocess(
                image[None], output_type="pil"
            )
            images.append(processed[0])
        return images, problems

    def _float32_vae(self):
        if self._vae32 is None:
            import copy

            import torch

            self._vae32 = copy.deepcopy(self._pipe.vae).to(torch.float32)
        return self._vae32

    # --- bookkeeping -----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        try:
            import diffusers

            version = diffusers.__version__
        except ImportError:
            version = None
        info = {
            "model": self.options.model,
            "path": str(self._resolved) if self._resolved else None,
            "sha256": self.model_sha256(),
            "diffusers": version,
            "sampler": self.options.sampler,
        }
        if self.options.upscaler_model:
            info["upscaler_model"] = self.options.upscaler_model
        return info

    def model_sha256(self) -> str | None:
        """sha256 of the checkpoint file, or of model_index.json for a folder."""
        if self._sha256 is None:
            path = self._resolved or Path(self.options.model).expanduser()
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
        self._upscaler = None
        self._vae32 = None
        self._encoded.clear()
        self._tokenized.clear()
        if device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def _bad_images(pixels) -> dict[int, str]:
    """Which decoded images (each ``(3, h, w)`` in [-1, 1]) hold NaN or are black."""
    import torch

    bad = {}
    for row, image in enumerate(pixels):
        image = image.float()
        if not torch.isfinite(image).all():
            bad[row] = "NaN"
        elif float(image.max()) <= -1 + 1 / 255:
            bad[row] = "an all-black image"
    return bad


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
EXPECTED_MODEL = (
    "expected a diffusers folder with model_index.json, a single-file .safetensors "
    "(or .ckpt) checkpoint, or a Hub id (org/name) in the local Hugging Face cache"
)


def _first_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line, or its type's name."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _check_local_model(model: str) -> None:
    """Refuse an existing local path that cannot be a model, before any work."""
    if civitai.parse_ref(model) is not None:
        return
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise ConfigError(
            f"generator (diffusers): generator.model {str(path)!r} is a folder "
            f"without model_index.json; {EXPECTED_MODEL}"
        )
    if path.is_file() and path.suffix.lower() not in (*PICKLED, ".safetensors"):
        raise ConfigError(
            f"generator (diffusers): generator.model {str(path)!r} is no model "
            f"checkpoint; {EXPECTED_MODEL}"
        )


def resolve_model(options: DiffusersOptions) -> Path:
    """The local file or folder ``generator.model`` names.

    ``civitai:<id>`` is downloaded to (or found in) the Civitai cache; an
    ``org/name`` that is no local path is a Hugging Face Hub id, fetched into the
    Hub cache unless ``local_files_only``; anything else is a path as given.
    """
    model = options.model
    version = civitai.parse_ref(model)
    if version is not None:
        downloader = civitai.Civitai(
            cache_dir=options.civitai_cache_dir,
            base_url=options.civitai_base_url,
            token_env=options.civitai_key_env,
        )
        return downloader.fetch(version)
    path = Path(model).expanduser()
    if (
        path.exists()
        or not HUB_ID.fullmatch(model)
        or path.suffix.lower() in (*PICKLED, ".safetensors")
    ):
        return path
    return _hub_snapshot(model, options)


def _hub_snapshot(repo_id: str, options: DiffusersOptions) -> Path:
    """The Hub cache's folder for a pipeline repo; downloaded when allowed."""
    from diffusers import DiffusionPipeline

    from .remote import loopback_only

    # Tests (and CHATROOM_LOOPBACK_ONLY) never reach the Hub: the cache only.
    local_only = options.local_files_only or loopback_only()
    offline = local_only or os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "yes")
    try:
        folder = DiffusionPipeline.download(
            repo_id,
            local_files_only=local_only,
            use_safetensors=None if options.allow_pickle else True,
        )
    except (OSError, ValueError) as exc:
        if offline:
            raise ConfigError(
                f"generator (diffusers): {repo_id!r} is no local path and not in "
                "the Hugging Face cache, and downloads are off (local_files_only or "
                "HF_HUB_OFFLINE); "
                f"download it first (hf download {repo_id}) or set generator.model "
                "to a local diffusers folder"
            ) from None
        raise ConfigError(
            f"generator (diffusers): cannot fetch {repo_id!r} from the Hugging "
            f"Face Hub: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    return Path(folder)


def is_sdxl(path: Path, config: str = "") -> bool:
    """Whether a diffusers folder (or a single file's config folder) is SDXL."""
    folder = path if path.is_dir() else Path(config).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        return False
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "XL" in str(data.get("_class_name", "")) or "text_encoder_2" in data


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
