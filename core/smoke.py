"""Tiny random-weight models of the real architectures, for smoke runs and tests.

``write_smoke_models(directory)`` writes, fully offline:

- ``sd15/``: a diffusers Stable Diffusion 1.5 folder (UNet, VAE, CLIP text encoder,
  CLIP tokenizer, scheduler), saved with ``save_pretrained`` so that
  ``StableDiffusionPipeline.from_pretrained`` loads it like a real checkpoint;
- ``sd15.safetensors``: the same model as one file in the original SD checkpoint
  layout (``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*``), which ``from_single_file`` loads with
  ``config=sd15/``;
- ``sdxl/``: a diffusers SDXL folder in the real layout (a UNet with ``text_time``
  added conditioning, CLIP-L and an OpenCLIP-bigG-style encoder with projection,
  two tokenizers, the Euler scheduler), which ``StableDiffusionXLPipeline`` loads;
- ``esrgan/RealESRGAN_x4plus-smoke.safetensors``: an x4 RRDBNet (the "R-ESRGAN 4x+"
  architecture) in Real-ESRGAN's key layout, with few blocks and filters;
- ``blip2/``: a BLIP-2 (OPT) model and processor, saved so that
  ``Blip2ForConditionalGeneration`` and ``Blip2Processor`` load it;
- ``clip/``: a CLIP model and processor (``CLIPModel``/``CLIPProcessor``), with a
  LAION-style NSFW head for it in ``clip_nsfw/head.safetensors``;
- ``nima/nima-smoke.safetensors``: a NIMA network (pyiqa's layout) on timm's tiny
  test EfficientNet;
- ``depth/``: a Depth Anything model and processor (``AutoModelForDepthEstimation``,
  ``AutoImageProcessor``) with a tiny DINOv2 backbone;
- ``openpose/body_pose_model.pth``: OpenPose's body model at full size (about
  200 MB; its architecture is fixed), which controlnet_aux's ``Body`` loads;
- ``graphonomy/inference.pth``: Graphonomy's CIHP network at full size (about
  170 MB), in the published checkpoint's key layout;
- ``smoke.toml``: a run config that points every local backend at those files.

The weights are random (seeded, so the files are the same on every write): the models
run through the same code as real weights but produce noise and garbage text.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from .errors import InputError, MissingDependency

log = logging.getLogger(__name__)

SEED = 1234

# Words for the tiny BLIP-2 tokenizer: enough English that random generations read
# as words, plus what the fashion questions use.
WORDS = """
a an the of and or in on at to with without for from by is are was be it this that
what which who how where does do wearing wear wears worn person man woman girl boy
people photo picture image background plain white black grey gray blue red green
yellow pink purple brown beige orange navy cream gold silver dark light bright pale
clothes clothing outfit dress shirt t-shirt blouse top jacket coat blazer sweater
hoodie cardigan skirt pants trousers jeans shorts suit vest jumpsuit shoes boots
sneakers heels sandals loafers bag hat cap scarf glasses sunglasses belt watch
necklace earrings bracelet ring jewellery accessories accessory pattern patterned
texture striped stripes floral plaid checked solid printed print denim leather cotton
silk wool knit lace long short sleeve sleeves sleeveless casual formal elegant
street style fashion attributes key color colour colors material fit length shape
pose standing walking sitting posing front side back full body looking camera
studio outdoor indoor wall street city park room floor describe detail details
detailed look looks like has have wearing answer question yes no not very some
two one small large big tall slim loose tight modern classic vintage simple
""".split()

PUNCTUATION = [".", ",", ":", "?", "!", "'", "-", "(", ")"]
ESRGAN_FILE = "RealESRGAN_x4plus-smoke.safetensors"


def write_smoke_models(directory: str | Path) -> Path:
    """Write the tiny models and ``smoke.toml`` into ``directory``; return it."""
    directory = Path(directory).expanduser().resolve()
    check_smoke_config(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"smoke-models: cannot make the folder {directory}: {exc.strerror or exc}"
        ) from None
    try:
        import torch
    except ImportError:
        raise MissingDependency("torch", "local", "smoke models") from None

    started = time.perf_counter()
    torch.manual_seed(SEED)
    write_sd15(directory / "sd15")
    write_sd15_single_file(directory / "sd15", directory / "sd15.safetensors")
    torch.manual_seed(SEED)
    write_esrgan(directory / "esrgan" / ESRGAN_FILE)
    torch.manual_seed(SEED)
    write_blip2(directory / "blip2")
    torch.manual_seed(SEED)
    write_sdxl(directory / "sdxl")
    torch.manual_seed(SEED)
    write_clip_and_nima(directory)
    torch.manual_seed(SEED)
    from chatroom.plugins.control_maps import write_tiny_depth_model

    write_tiny_depth_model(directory / "depth")
    from chatroom.plugins import graphonomy, openpose

    openpose.write_smoke_checkpoint(directory / "openpose", SEED)
    graphonomy.write_smoke_checkpoint(directory / "graphonomy", SEED)
    write_config(directory)
    log.info(
        "wrote smoke models to %s in %.1f s", directory, time.perf_counter() - started
    )
    return directory


# --- Stable Diffusion 1.5 --------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-to-printable-character table byte-level BPE tokenizers use."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


def _clip_vocab(directory: Path) -> None:
    """Write a CLIP-style vocab.json and merges.txt: bytes, bytes + </w>, merges."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = [
        ("t", "h"),
        ("th", "e</w>"),
        ("a", "n"),
        ("an", "d</w>"),
        ("i", "n"),
        ("o", "n</w>"),
        ("e", "r</w>"),
        ("e", "s</w>"),
    ]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_vae(**config):
    """A four-level AutoencoderKL as in SD (8x down-sampling), with tiny widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        **config,
    )


def write_sd15(directory: Path) -> Path:
    """A tiny SD 1.5 pipeline folder: 8x VAE, two-level UNet, four-layer CLIP."""
    try:
        import torch
        from diffusers import (
            DPMSolverMultistepScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError as exc:
        raise MissingDependency(
            exc.name or "diffusers", "local", "smoke models"
        ) from None

    # vocab.json and merges.txt stay beside tokenizer.json, as in the real folders.
    vocab_dir = directory / "tokenizer"
    _clip_vocab(vocab_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(vocab_dir), model_max_length=77)

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    # A trained CLIP's final layer norm has a bias, so its embeddings' mean is not
    # zero; the WebUI's emphasis divides by that mean.
    norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    with torch.no_grad():
        norm.bias.copy_(torch.randn(norm.bias.shape) * 0.5)

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    # Four levels, as in SD: 8x down-sampling, so 64x96 pixels are 8x12 latents.
    vae = tiny_vae(sample_size=64)
    # SD's scaled-linear betas, as the real checkpoints' scheduler configs say.
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


# --- Stable Diffusion XL ---------------------------------------------------------


def write_sdxl(directory: Path) -> Path:
    """A tiny SDXL pipeline folder, laid out as stable-diffusion-xl-base-1.0.

    CLIP-L and the bigG-style encoder have different widths (32 and 48), so a
    mix-up of the two fails loudly; the UNet's cross-attention reads both side by
    side (80), and its ``text_time`` embedding takes bigG's pooled projection (32)
    and the six size numbers of ``add_time_ids``.
    """
    try:
        import torch
        from diffusers import (
            EulerDiscreteScheduler,
            StableDiffusionXLPipeline,
            UNet2DConditionModel,
        )
        from transformers import (
            CLIPTextConfig,
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )
    except ImportError as exc:
        raise MissingDependency(
            exc.name or "diffusers", "local", "smoke models"
        ) from None

    _clip_vocab(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(
        str(directory / "tokenizer"), model_max_length=77
    )
    # SDXL's second tokenizer pads with "!", as OpenCLIP does.
    _clip_vocab(directory / "tokenizer_2")
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        str(directory / "tokenizer_2"), model_max_length=77, pad_token="!"
    )

    def text_config(hidden_size: int, act: str) -> CLIPTextConfig:
        return CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act=act,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    # CLIP-L uses quick GELU, OpenCLIP bigG the exact one.
    text_encoder = CLIPTextModel(text_config(32, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(48, "gelu"))
    with torch.no_grad():
        for encoder in (text_encoder, text_encoder_2):
            norm = getattr(encoder, "text_model", encoder).final_layer_norm
            norm.bias.copy_(torch.randn(norm.bias.shape) * 0.5)

    time_dim = 8
    pooled_dim = text_encoder_2.config.projection_dim
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=32 + 48,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
        norm_num_groups=8,
    )
    vae = tiny_vae(sample_size=128, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


def _ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet key in the original (LDM) layout of SD 1.x checkpoints."""
    top = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    module, _, param = key.rpartition(".")
    if module in top:
        return f"{top[module]}.{param}"
    per_level = config["layers_per_block"] + 1
    resnet = (
        ("norm1", "in_layers.0"),
        ("conv1", "in_layers.2"),
        ("time_emb_proj", "emb_layers.1"),
        ("norm2", "out_layers.0"),
        ("conv2", "out_layers.3"),
        ("conv_shortcut", "skip_connection"),
    )

    def resnet_rest(rest: str) -> str:
        for new, old in resnet:
            if rest == new or rest.startswith(new + "."):
                return old + rest[len(new) :]
        return rest

    parts = key.split(".")
    if parts[0] == "down_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.P
            return f"input_blocks.{1 + level * per_level + per_level - 1}.0.op.{param}"
        index = 1 + level * per_level + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{index}.0.{resnet_rest(rest)}"
        return f"input_blocks.{index}.1.{rest}"
    if parts[0] == "mid_block":
        rest = ".".join(parts[3:])
        if parts[1] == "resnets":
            return f"middle_block.{2 * int(parts[2])}.{resnet_rest(rest)}"
        return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        level, kind = int(parts[1]), parts[2]
        if kind == "upsamplers":
            has_attention = config["up_block_types"][level].startswith("CrossAttn")
            slot = 2 if has_attention else 1
            index = level * per_level + per_level - 1
            return f"output_blocks.{index}.{slot}.conv.{param}"
        index = level * per_level + int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{index}.0.{resnet_rest(rest)}"
        return f"output_blocks.{index}.1.{rest}"
    raise ValueError(f"no LDM name for UNet key {key!r}")


def _ldm_vae_key(key: str, config) -> str:
    """A diffusers VAE key in the original (LDM) layout."""
    simple = {"conv_norm_out": "norm_out"}
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return key
    coder, rest = parts[0], parts[1:]
    if rest[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return ".".join([coder, simple.get(rest[0], rest[0]), *rest[1:]])
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            tail = ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
            return f"{coder}.mid.block_{int(rest[2]) + 1}.{tail}"
        attention = {
            "group_norm": "norm",
            "to_q": "q",
            "to_k": "k",
            "to_v": "v",
            "to_out": "proj_out",
        }
        name = attention[rest[3]]
        return f"{coder}.mid.attn_1.{name}.{rest[-1]}"
    levels = len(config["up_block_types"])
    level = int(rest[1])
    if rest[0] == "down_blocks":
        if rest[2] == "downsamplers":
            return f"{coder}.down.{level}.downsample.conv.{rest[-1]}"
        tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
        return f"{coder}.down.{level}.block.{rest[3]}.{tail}"
    original = levels - 1 - level  # LDM numbers the decoder's levels upwards
    if rest[2] == "upsamplers":
        return f"{coder}.up.{original}.upsample.conv.{rest[-1]}"
    tail = ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
    return f"{coder}.up.{original}.block.{rest[3]}.{tail}"


def sd15_single_file_state_dict(folder: Path) -> dict:
    """A diffusers SD 1.x folder's weights in the original single-file layout."""
    from safetensors.torch import load_file

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    state = {}
    unet = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    for key, tensor in unet.items():
        state["model.diffusion_model." + _ldm_unet_key(key, unet_config)] = tensor
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    for key, tensor in vae.items():
        name = _ldm_vae_key(key, vae_config)
        if ".mid.attn_1." in name and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # the LDM VAE's attention is 1x1 convs
        state["first_stage_model." + name] = tensor
    text = load_file(str(folder / "text_encoder" / "model.safetensors"))
    for key, tensor in text.items():
        key = key.removeprefix("text_model.")
        state["cond_stage_model.transformer.text_model." + key] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


def write_sd15_single_file(folder: Path, path: Path) -> Path:
    """Write ``folder``'s SD 1.x weights as one original-layout .safetensors file."""
    from safetensors.torch import save_file

    save_file(sd15_single_file_state_dict(folder), str(path))
    return path


# --- Real-ESRGAN -----------------------------------------------------------------


def esrgan_state_dict(
    num_feat: int = 8, num_grow: int = 32, num_blocks: int = 2, scale: int = 4
) -> dict:
    """Random RRDBNet weights in Real-ESRGAN's (BasicSR's) key layout.

    RealESRGAN_x4plus has 64 features, 32 growth channels and 23 blocks; the layout
    is the same with fewer features and blocks, so spandrel reads this as the same
    architecture (it assumes ESRGAN's 32 growth channels).
    """
    import torch

    def conv(out_channels: int, in_channels: int, prefix: str) -> dict:
        weight = torch.randn(out_channels, in_channels, 3, 3) * 0.5 / in_channels
        return {f"{prefix}.weight": weight, f"{prefix}.bias": torch.zeros(out_channels)}

    state = conv(num_feat, 3, "conv_first")
    for block in range(num_blocks):
        for rdb in (1, 2, 3):
            prefix = f"body.{block}.rdb{rdb}"
            for i in range(1, 5):
                state |= conv(
                    num_grow, num_feat + (i - 1) * num_grow, f"{prefix}.conv{i}"
                )
            state |= conv(num_feat, num_feat + 4 * num_grow, f"{prefix}.conv5")
    state |= conv(num_feat, num_feat, "conv_body")
    for i in range(1, int(scale).bit_length()):
        state |= conv(num_feat, num_feat, f"conv_up{i}")
    state |= conv(num_feat, num_feat, "conv_hr")
    state |= conv(3, num_feat, "conv_last")
    # Start near mid-grey so the random model's output is not clamped to black.
    state["conv_last.bias"] += 0.5
    return state


def write_esrgan(path: Path) -> Path:
    """A tiny random RealESRGAN_x4plus-layout model as .safetensors."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(esrgan_state_dict(), str(path))
    return path


# --- BLIP-2 ----------------------------------------------------------------------


def _blip2_tokenizer():
    """An OPT-style tokenizer (<s> <pad> </s> <unk>) over a small English word list."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = list(dict.fromkeys(WORDS + PUNCTUATION))
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        add_bos_token=True,
    )


def write_blip2(directory: Path) -> Path:
    """A tiny BLIP-2 with an OPT language model, its processor and tokenizer."""
    try:
        from transformers import (
            Blip2Config,
            Blip2ForConditionalGeneration,
            Blip2Processor,
            Blip2QFormerConfig,
            Blip2VisionConfig,
            BlipImageProcessor,
            OPTConfig,
        )
    except ImportError as exc:
        raise MissingDependency(
            exc.name or "transformers", "local", "smoke models"
        ) from None

    num_query_tokens = 4
    tokenizer = _blip2_tokenizer()
    image_processor = BlipImageProcessor(
        size={"height": 32, "width": 32},
        do_resize=True,
        do_normalize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    # The processor adds the <image> token to the tokenizer; the model's vocabulary
    # and image_token_index must include it.
    processor = Blip2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_query_tokens=num_query_tokens,
    )
    image_token_index = processor.tokenizer.convert_tokens_to_ids("<image>")

    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            cross_attention_frequency=1,
            encoder_hidden_size=32,
            vocab_size=64,
            max_position_embeddings=64,
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=len(processor.tokenizer),
            hidden_size=32,
            word_embed_proj_dim=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            pad_token_id=processor.tokenizer.pad_token_id,
            bos_token_id=processor.tokenizer.bos_token_id,
            eos_token_id=processor.tokenizer.eos_token_id,
        ).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_index,
    )
    model = Blip2ForConditionalGeneration(config)
    model.eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    processor.save_pretrained(str(directory))
    return directory


# --- CLIP, the NSFW head, NIMA ------------------------------------------------------


def write_clip_and_nima(directory: Path) -> None:
    """``clip/``, ``clip_nsfw/head.safetensors`` and ``nima/nima-smoke.safetensors``."""
    from chatroom.plugins.clip_nsfw import SMOKE_HEAD_FILE, write_smoke_clip
    from chatroom.plugins.clip_nsfw import write_smoke_head as write_head
    from chatroom.plugins.quality import write_smoke_nima

    write_smoke_clip(directory / "clip")
    write_head(directory / "clip_nsfw" / SMOKE_HEAD_FILE, input_size=32)
    write_smoke_nima(directory / "nima")


# --- the run config --------------------------------------------------------------


def check_smoke_config(directory: Path) -> None:
    """Refuse a ``directory`` that is a file, or whose ``smoke.toml`` someone else
    wrote: only a config that starts with this module's header line (or is the
    same text) may be replaced."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(
            f"smoke-models: {directory} is a file, not a folder; give a folder to "
            "write the smoke models into"
        )
    path = directory / "smoke.toml"
    if not path.exists():
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = ""
    ours = smoke_config(directory)
    if text != ours and text.partition("\n")[0] != ours.partition("\n")[0]:
        raise InputError(
            f"smoke-models: {path} exists and was not written by smoke-models; "
            "move it away or give another folder"
        )


def write_config(directory: Path) -> Path:
    """``smoke.toml``: every local backend pointed at the tiny models."""
    path = directory / "smoke.toml"
    path.write_text(smoke_config(directory), encoding="utf-8")
    return path


def smoke_config(directory: Path) -> str:
    """The text of ``smoke.toml`` for models in ``directory``."""
    sd15 = (directory / "sd15").as_posix()
    esrgan = (directory / "esrgan" / ESRGAN_FILE).as_posix()
    blip2 = (directory / "blip2").as_posix()
    clip = (directory / "clip").as_posix()
    nima = (directory / "nima" / "nima-smoke.safetensors").as_posix()
    text = f"""\
# A smoke run: every local backend uses the tiny random-weight models beside this
# file (written by chatroom.smoke.write_smoke_models). The images are noise and the
# captions garbage, so the content-judging annotator runs in observe mode: it records
# what it would decide and rejects nothing. Tiny models run fastest on the CPU.

[extractor]
use = "blip2"
model = "{blip2}"
discover = 2
max_new_tokens = 8
device = "cpu"

[generator]
use = "diffusers"
model = "{sd15}"
sampler = "DPM++ 2M SDE Karras"
steps = 2
cfg_scale = 4.0
width = 64
height = 96
clip_skip = 2
device = "cpu"
dtype = "float32"
threads = 2
upscaler_model = "{esrgan}"

# The paper's hires fix: an R-ESRGAN 4x+ upscale to x2, then img2img.
[generator.hires]
enabled = true
upscaler = "R-ESRGAN 4x+"
scale = 2.0
steps = 2
denoise = 0.5

# Random weights judge nothing: the NSFW and quality filters only observe (on, as
# the fashion pack's paper profile declares them off until given weights).
[filters.clip_nsfw]
use = "clip_nsfw"
enabled = true
model = "{clip}"
head = "{directory.as_posix()}/clip_nsfw/head.safetensors"
mode = "observe"

[filters.quality]
use = "quality"
enabled = true
metric = "nima"
weights = "{nima}"
mode = "observe"

[annotators.captions]
use = "blip2_captions"
model = "{blip2}"
mode = "observe"
max_new_tokens = 12
device = "cpu"

# The furniture and architecture packs' content filters judge noise: they observe.
# `domains` keeps each to the packs it belongs to. Their depth maps: a tiny model.
[filters.single_object]
domains = ["furniture"]
mode = "observe"

[filters.no_people]
domains = ["architecture"]
mode = "observe"

[annotators.depth_map]
domains = ["furniture", "architecture"]
model = "{directory.as_posix()}/depth"
device = "cpu"

# The paper's OpenPose and Graphonomy at full size with random weights: OpenPose
# finds nobody and the parts are noise, so both observe (the masks are still saved).
[filters.openpose]
use = "openpose"
domains = ["fashion"]
enabled = true
checkpoint = "{directory.as_posix()}/openpose"
mode = "observe"
device = "cpu"

[annotators.graphonomy]
use = "graphonomy"
domains = ["fashion"]
enabled = true
checkpoint = "{directory.as_posix()}/graphonomy"
mode = "observe"
device = "cpu"
flip = false  # halves the full-size network's time on the CPU
"""
    return text
