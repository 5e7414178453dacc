"""The paper's NSFW filter: LAION's CLIP-based detector, run in torch.

LAION's detector is a small Keras MLP over L2-normalised CLIP image embeddings: a
feature-wise normalisation (a mean and a variance per input), dense ReLU layers and
one sigmoid output. For ViT-L/14 (768-d embeddings) the dense widths are 64, 512,
256, 1; for ViT-B/32 (512-d) they are 32, 32, 1. ``NsfwHead`` builds that MLP for any
widths, read off the weights it loads.

Head files:

- ``.safetensors`` with this module's names (``norm.mean``, ``norm.variance``,
  ``layers.<i>.weight`` / ``.bias``, weights as ``[out, in]``);
- LAION's own torch ports (``.pth`` with ``norm.*`` and ``linear_<n>.*``), read with
  ``weights_only``;
- the published Keras weights: ``convert_keras_head`` reads a Keras ``.h5`` file with
  h5py and writes the ``.safetensors`` file above (no TensorFlow needed).

The CLIP model is a local folder (``CLIPModel.from_pretrained``), never a Hub id.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pydantic import Field

from chatroom.components import Filter, Options
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict
from chatroom.plugins.weights import unreadable

log = logging.getLogger(__name__)

EXTRA = "clip"
# Input size and dense widths of LAION's published heads.
LAION_HEADS = {"ViT-L/14": (768, 64, 512, 256, 1), "ViT-B/32": (512, 32, 32, 1)}
SMOKE_HEAD_FILE = "head.safetensors"
_EPSILON = 1e-7


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependency("torch", EXTRA, "clip_nsfw") from None
    return torch


# --- the head --------------------------------------------------------------------


def nsfw_head(widths: tuple[int, ...] | list[int]):
    """LAION's MLP for ``widths`` = (embedding size, hidden widths..., 1)."""
    torch = _torch()
    from torch import nn

    class NsfwHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.widths = tuple(widths)
            self.norm = nn.Module()
            self.norm.register_buffer("mean", torch.zeros(widths[0]))
            self.norm.register_buffer("variance", torch.ones(widths[0]))
            self.layers = nn.ModuleList(
                nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=False)
            )

        @property
        def input_size(self) -> int:
            return self.widths[0]

        def forward(self, embeddings):
            std = self.norm.variance.sqrt().clamp_min(_EPSILON)
            x = (embeddings - self.norm.mean) / std
            for number, layer in enumerate(self.layers):
                x = layer(x)
                last = number == len(self.layers) - 1
                x = torch.sigmoid(x) if last else torch.relu(x)
            return x.reshape(-1)

    return NsfwHead()


def _widths(state: dict) -> tuple[int, ...]:
    numbers = sorted(
        int(m.group(1))
        for key in state
        if (m := re.fullmatch(r"layers\.(\d+)\.weight", key))
    )
    if not numbers or numbers != list(range(len(numbers))):
        raise ValueError("no layers.<i>.weight tensors")
    shapes = [tuple(state[f"layers.{n}.weight"].shape) for n in numbers]
    return (shapes[0][1], *(out for out, _ in shapes))


def _from_laion_names(state: dict) -> dict:
    """LAION's torch ports name the dense layers linear_1, linear_2, ..."""
    renamed = {}
    for key, value in state.items():
        m = re.fullmatch(r"linear_(\d+)\.(weight|bias)", key)
        renamed[f"layers.{int(m.group(1)) - 1}.{m.group(2)}" if m else key] = value
    return renamed


def load_head(path: str | Path, who: str = "clip_nsfw: head"):
    """An ``NsfwHead`` with the weights of a head file, in eval mode.

    ``who`` names the setting the path came from in errors."""
    torch = _torch()
    path = Path(path).expanduser()
    convert = "convert Keras weights with chatroom.plugins.clip_nsfw.convert_keras_head"
    if not path.is_file():
        raise ConfigError(f"{who} {path}: head weights not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # text, HTML, a cut-off download: all unreadable
        raise ConfigError(
            f"{who} {path} is not an NSFW head ({unreadable(exc)}); {convert}"
        ) from None
    if not isinstance(state, dict):
        raise ConfigError(
            f"{who} {path} is not an NSFW head (it holds a {type(state).__name__}, "
            f"not a state dict); {convert}"
        )
    state = _from_laion_names(state)
    try:
        head = nsfw_head(_widths(state))
        head.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"{who} {path} is not an NSFW head ({first}); {convert}"
        ) from None
    if head.widths[-1] != 1:
        raise ConfigError(
            f"{who} {path} has {head.widths[-1]} outputs; the detector has one"
        )
    return head.eval()


def save_head(head, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
    save_file(state, str(path), metadata={"format": "chatroom-nsfw-head"})
    return path


def convert_keras_head(h5_path: str | Path, out_path: str | Path) -> Path:
    """Read LAION's Keras weights (``.h5``) with h5py; write our ``.safetensors``.

    The layers are taken in the order the file lists them (``layer_names``): the
    normalisation layer gives ``mean`` and ``variance``, each dense layer a
    ``kernel`` (``[in, out]`` in Keras, transposed here) and a ``bias``.
    """
    try:
        import h5py
    except ImportError:
        raise MissingDependency("h5py", EXTRA, "convert_keras_head") from None
    import numpy as np

    torch = _torch()

    def arrays(group) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}

        def keep(name, obj) -> None:  # visititems stops at a non-None return
            if isinstance(obj, h5py.Dataset):
                found.setdefault(name.rsplit("/", 1)[-1].split(":")[0], obj[()])

        group.visititems(keep)
        return found

    h5_path = Path(h5_path)
    state: dict = {}
    with h5py.File(h5_path, "r") as fh:
        root = fh["model_weights"] if "model_weights" in fh else fh
        names = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in root.attrs.get("layer_names", list(root.keys()))
        ]
        dense = 0
        for name in names:
            weights = arrays(root[name])
            if "kernel" in weights:
                kernel = np.asarray(weights["kernel"], dtype=np.float32)
                state[f"layers.{dense}.weight"] = torch.from_numpy(kernel.T.copy())
                state[f"layers.{dense}.bias"] = torch.from_numpy(
                    np.asarray(weights["bias"], dtype=np.float32)
                )
                dense += 1
            elif "mean" in weights and "variance" in weights:
                for key in ("mean", "variance"):
                    value = np.asarray(weights[key], dtype=np.float32).reshape(-1)
                    state[f"norm.{key}"] = torch.from_numpy(value)
    if not dense:
        raise ConfigError(f"clip_nsfw: {h5_path} holds no dense layers")
    widths = _widths(state)
    state.setdefault("norm.mean", torch.zeros(widths[0]))
    state.setdefault("norm.variance", torch.ones(widths[0]))
    head = nsfw_head(widths)
    head.load_state_dict(state, strict=True)
    return save_head(head, out_path)


# --- CLIP ------------------------------------------------------------------------


def load_clip(folder: str | Path, device: str = "cpu"):
    """(model, processor) of a local CLIP folder, in eval mode."""
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as exc:
        raise MissingDependency(exc.name or "transformers", EXTRA, "clip") from None
    folder = str(Path(folder).expanduser())
    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the CLIP model {folder!r} offline: give a local folder "
            f"that CLIPModel and CLIPProcessor load ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval().to(device), processor


def projection_dim(folder: str | Path) -> int:
    """The size of a CLIP folder's image embeddings, read from its config."""
    import json

    config = Path(folder).expanduser() / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config}: not a CLIP model folder ({exc})") from None
    if "projection_dim" not in data:
        raise ConfigError(f"{config}: no projection_dim; not a CLIP model folder")
    return int(data["projection_dim"])


def clip_image_embeddings(model, processor, images, device: str = "cpu"):
    """L2-normalised CLIP image embeddings, one row per image."""
    torch = _torch()
    inputs = processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
    with torch.inference_mode():
        out = model.get_image_features(pixel_values=inputs["pixel_values"].to(device))
        # transformers 5 returns a model output with the projection as pooler_output
        features = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


# --- the filter ------------------------------------------------------------------


class ClipNsfwOptions(Options):
    model: str = Field(
        ..., description="Local CLIP model folder (ViT-L/14 for LAION's main head)."
    )
    head: str = Field(
        ...,
        description="NSFW head weights: a .safetensors file (see "
        "convert_keras_head) or LAION's torch port (.pth).",
    )
    threshold: float = Field(
        0.5, gt=0, lt=1, description="Reject when the NSFW score is at or above."
    )
    device: str = Field("cpu", description="Torch device.")
    batch_size: int = Field(8, ge=1, description="Images handed to the filter at once.")


class ClipNsfwFilter(Filter):
    name = "clip_nsfw"
    description = "rejects images LAION's CLIP-based NSFW detector scores high"
    Options = ClipNsfwOptions
    cost = 1.5
    requires = (
        ("transformers", "chatroom[transformers]"),
        ("torch", "chatroom[torch]"),
    )

    def __init__(self, options, context):
        super().__init__(options, context)
        self.head = load_head(options.head, f"filters ({self.name}): option 'head' =")
        # Fail closed: a head built for another CLIP would judge garbage.
        dim = projection_dim(options.model)
        if dim != self.head.input_size:
            raise ConfigError(
                f"filters (clip_nsfw): head {options.head} takes {self.head.input_size}"
                f"-d embeddings but the CLIP model {options.model} gives {dim}-d; use "
                "the head trained for that CLIP"
            )
        self._clip = None
        self.images = 0

    def embed(self, images):
        """Normalised CLIP image embeddings (the model loads on first use)."""
        if self._clip is None:
            self._clip = load_clip(self.options.model, self.options.device)
        model, processor = self._clip
        return clip_image_embeddings(model, processor, images, self.options.device)

    def scores(self, images) -> list[float]:
        torch = _torch()
        embeddings = self.embed(images)
        with torch.inference_mode():
            return [float(s) for s in self.head(embeddings.float())]

    def check(self, candidates) -> list[Verdict]:
        present = [c for c in candidates if c.image is not None]
        scores = iter(self.scores([c.image for c in present]) if present else [])
        self.images += len(present)
        threshold = self.options.threshold
        verdicts = []
        for candidate in candidates:
            if candidate.image is None:
                verdicts.append(Verdict(passed=False, reason="no image"))
                continue
            score = next(scores)
            recorded = {"nsfw": round(score, 4)}
            if score >= threshold:
                reason = f"nsfw: clip score {score:.2f} >= {threshold:g}"
                verdicts.append(Verdict(passed=False, reason=reason, scores=recorded))
            else:
                verdicts.append(Verdict(passed=True, scores=recorded))
        return verdicts

    def describe(self):
        return {
            "model": self.options.model,
            "head": self.options.head,
            "head_widths": list(self.head.widths),
        }

    def usage(self):
        return {"images": float(self.images)}

    def close(self) -> None:
        self._clip = None


# --- smoke models ----------------------------------------------------------------


def write_smoke_clip(directory: Path) -> Path:
    """A tiny CLIP (32-d projection) with tokenizer and processor, saved so that
    ``CLIPModel`` and ``CLIPProcessor`` load it like a real folder."""
    try:
        from transformers import (
            CLIPConfig,
            CLIPImageProcessor,
            CLIPModel,
            CLIPProcessor,
            CLIPTokenizer,
        )
    except ImportError as exc:
        raise MissingDependency(exc.name or "transformers", EXTRA, "clip") from None
    from chatroom.smoke import _clip_vocab

    directory.mkdir(parents=True, exist_ok=True)
    _clip_vocab(directory)
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    CLIPModel(config).save_pretrained(str(directory), safe_serialization=True)
    images = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(
        str(directory)
    )
    return directory


def write_smoke_head(path: Path, input_size: int = 32) -> Path:
    """A random head with ViT-B/32's hidden widths over ``input_size`` inputs."""
    head = nsfw_head((input_size, *LAION_HEADS["ViT-B/32"][1:]))
    return save_head(head, path)


@hookimpl
def register_filters(register):
    register(ClipNsfwFilter)
