"""A no-reference quality filter: NIMA (pyiqa's checkpoints) or BRISQUE (offline).

NIMA predicts the distribution of the 1-10 ratings people give a photo; its score is
the mean of that distribution (higher is better). BRISQUE fits natural-scene
statistics and ships its model inside the ``brisque`` wheel (lower is better).

NIMA's weights are read from a local file only: a pyiqa checkpoint (``.pth`` with a
``params`` entry, as pyiqa publishes them) or a ``.safetensors`` file with the same
key names whose metadata names the timm backbone (``base_model``) and the number of
rating classes (``num_classes``). The architecture is built here with a timm
backbone at ``pretrained=False`` and the whole checkpoint loads over it, so nothing
is ever fetched.

``score_images`` is the entry point other code (the report) uses.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Literal

from pydantic import Field

from chatroom.components import Filter, Options
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict
from chatroom.plugins.weights import save_safetensors, unreadable

log = logging.getLogger(__name__)

EXTRA = "quality"
METRICS = ("nima", "brisque")
# Scores at which an image is rejected when no threshold is given: NIMA below,
# BRISQUE above. BRISQUE reads large flat studio backgrounds as poor quality (one
# of the shared studio photos scores 115), so the offline profile only observes it.
DEFAULT_THRESHOLDS = {"nima": 4.0, "brisque": 80.0}
DEFAULT_BACKBONE = "inception_resnet_v2"
SMOKE_NIMA_FILE = "nima-smoke.safetensors"
NIMA_FILES = (
    "expected pyiqa's NIMA .pth or a .safetensors file with 'base_model' and "
    "'num_classes' in its metadata"
)


# --- NIMA ------------------------------------------------------------------------


def nima_network(base_model: str, num_classes: int = 10):
    """NIMA with a randomly initialised timm backbone, laid out as pyiqa lays it out.

    The module names (``base_model``, ``global_pool``, ``classifier``) are pyiqa's, so
    its published checkpoints load by their key names. The network is built here
    rather than through pyiqa: pyiqa's constructor downloads backbone weights, and
    pyiqa pulls in bitsandbytes, whose import asks the Hugging Face Hub about kernels.
    """
    try:
        import timm
        import torch
        from torch import nn
        from torchvision.transforms import functional as tf
    except ImportError as exc:
        raise MissingDependency(exc.name or "timm", EXTRA, "quality") from None

    class Nima(nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model = timm.create_model(
                base_model, pretrained=False, features_only=True
            )
            self.global_pool = nn.AdaptiveAvgPool2d(1)
            width = self.base_model.feature_info.channels()[-1]
            head = [nn.Flatten(), nn.Dropout(p=0.0), nn.Linear(width, num_classes)]
            if num_classes > 1:
                head.append(nn.Softmax(dim=-1))
            self.classifier = nn.Sequential(*head)
            cfg = self.base_model.pretrained_cfg
            self.size = int(cfg["input_size"][-1])
            self.register_buffer(
                "mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False
            )
            self.register_buffer(
                "std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False
            )
            self.register_buffer(
                "ratings",
                torch.arange(1, num_classes + 1, dtype=torch.float32),
                persistent=False,
            )

        def forward(self, pixels):
            """Mean opinion score of (N, 3, H, W) pixels in [0, 1]."""
            pixels = tf.center_crop(tf.resize(pixels, self.size), self.size)
            features = self.base_model((pixels - self.mean) / self.std)[-1]
            distribution = self.classifier(self.global_pool(features))
            if distribution.shape[-1] == 1:
                return distribution.reshape(-1)
            return (distribution * self.ratings).sum(dim=-1)

    return Nima()


def _read_checkpoint(path: Path, who: str) -> tuple[dict, dict[str, str]]:
    """The state dict and the metadata (safetensors only) of a NIMA checkpoint.

    ``who`` names the setting in errors, e.g. ``--nima``."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                return {key: fh.get_tensor(key) for key in fh.keys()}, meta
        import torch

        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except ImportError as exc:
        raise MissingDependency(exc.name or "torch", EXTRA, "quality") from None
    except Exception as exc:  # text, HTML, a cut-off download: all unreadable
        raise ConfigError(
            f"{who} {path} is not a NIMA checkpoint ({unreadable(exc)}); {NIMA_FILES}"
        ) from None
    if isinstance(loaded, dict) and "params" in loaded:
        loaded = loaded["params"]
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{who} {path} is not a NIMA checkpoint: it holds a "
            f"{type(loaded).__name__}, not a state dict; {NIMA_FILES}"
        )
    return loaded, {}


@functools.lru_cache(maxsize=2)
def load_nima(
    weights: str,
    device: str = "cpu",
    base_model: str = DEFAULT_BACKBONE,
    who: str = "quality: NIMA weights",
):
    """A NIMA network with the weights of a local checkpoint, in eval mode.

    ``who`` names the setting the path came from in errors."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"{who} {path}: no such file")
    state, meta = _read_checkpoint(path, who)
    base_model = meta.get("base_model", base_model)
    num_classes = int(meta.get("num_classes", 10))
    network = nima_network(base_model, num_classes)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1 if "\n" in str(exc) else 0].strip()
        raise ConfigError(
            f"{who} {path} is not a NIMA checkpoint for backbone '{base_model}' "
            f"({first})"
        ) from None
    return network.eval().to(device)


def _nima_scores(
    images,
    weights: str | None,
    device: str,
    base_model: str = DEFAULT_BACKBONE,
    who: str = "quality: NIMA weights",
) -> list[float]:
    if not weights:
        raise ConfigError(
            "quality: metric 'nima' needs weights: the path of a local NIMA checkpoint"
        )
    import numpy as np
    import torch

    network = load_nima(str(weights), device, base_model, who)
    scores = []
    with torch.inference_mode():
        for image in images:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
            scores.append(float(network(tensor).reshape(-1)[0]))
    return scores


# --- BRISQUE ---------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _brisque():
    try:
        from chatroom.report.quality import _scorer
    except ImportError as exc:
        raise MissingDependency(exc.name or "brisque", EXTRA, "quality") from None
    try:
        return _scorer()
    except ImportError as exc:
        raise MissingDependency(exc.name or "brisque", EXTRA, "quality") from None


def _brisque_scores(images) -> list[float]:
    import numpy as np

    from chatroom.report.quality import MAX_SIDE

    scorer = _brisque()
    scores = []
    for image in images:
        small = image.convert("RGB")
        small.thumbnail((MAX_SIDE, MAX_SIDE))
        try:
            value = float(scorer.score(np.asarray(small)))
        except Exception as exc:  # flat or tiny images make the fit fail
            log.info("no BRISQUE score: %s", exc)
            value = math.nan
        scores.append(value if math.isfinite(value) else math.nan)
    return scores


def score_images(
    images: list,
    metric: str,
    weights: str | None = None,
    device: str = "cpu",
    who: str = "quality: NIMA weights",
) -> list[float]:
    """One quality score per image: NIMA (1-10, higher is better) or BRISQUE
    (lower is better). An image BRISQUE cannot score gets NaN. ``who`` names the
    setting ``weights`` came from (e.g. ``--nima``) in errors."""
    if metric == "nima":
        return _nima_scores(images, weights, device, who=who)
    if metric == "brisque":
        return _brisque_scores(images)
    raise ConfigError(
        f"quality: unknown metric {metric!r}; expected one of {', '.join(METRICS)}"
    )


# --- the filter ------------------------------------------------------------------


class QualityOptions(Options):
    metric: Literal["nima", "brisque"] = Field(
        "brisque",
        description="'nima' (mean predicted rating 1-10, higher is better; needs "
        "weights) or 'brisque' (offline, lower is better).",
    )
    threshold: float | None = Field(
        None,
        description="Reject below this NIMA score or above this BRISQUE score; "
        "empty: 4.0 for NIMA, 80 for BRISQUE.",
    )
    weights: str | None = Field(
        None,
        description="Local NIMA checkpoint: pyiqa's .pth or a .safetensors file with "
        "'base_model' and 'num_classes' in its metadata. Never downloaded.",
    )
    base_model: str = Field(
        DEFAULT_BACKBONE,
        description="timm backbone of a .pth NIMA checkpoint (a .safetensors file "
        "names its own).",
    )
    device: str = Field("cpu", description="Torch device for NIMA.")
    batch_size: int = Field(4, ge=1, description="Images handed to the filter at once.")


class QualityFilter(Filter):
    name = "quality"
    description = "rejects images of low no-reference quality (NIMA or BRISQUE)"
    Options = QualityOptions
    cost = 2.0
    requires = (("timm", "chatroom[quality]"), ("brisque", "chatroom[quality]"))

    def __init__(self, options, context):
        super().__init__(options, context)
        metric = options.metric
        if metric == "nima":
            if not options.weights:
                raise ConfigError(
                    "filters (quality): metric 'nima' needs option 'weights' (a local "
                    "NIMA checkpoint); or use metric 'brisque'"
                )
            if not Path(options.weights).expanduser().is_file():
                raise ConfigError(
                    f"filters (quality): option 'weights' = {options.weights!r}: "
                    "no such file"
                )
        self.threshold = (
            options.threshold
            if options.threshold is not None
            else DEFAULT_THRESHOLDS[metric]
        )
        self.images = 0

    def _scores(self, images) -> list[float]:
        options = self.options
        if options.metric == "nima":
            return _nima_scores(
                images,
                options.weights,
                options.device,
                options.base_model,
                who="filters (quality): option 'weights' =",
            )
        return _brisque_scores(images)

    def check(self, candidates) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(candidates)
        images, where = [], []
        for number, candidate in enumerate(candidates):
            if candidate.image is None:
                verdicts[number] = Verdict(passed=False, reason="no image")
            else:
                images.append(candidate.image)
                where.append(number)
        scores = self._scores(images) if images else []
        self.images += len(images)
        metric = self.options.metric
        for number, score in zip(where, scores, strict=True):
            verdicts[number] = self._judge(metric, score)
        return verdicts

    def _judge(self, metric: str, score: float) -> Verdict:
        if math.isnan(score):
            return Verdict(passed=False, reason=f"low quality: no {metric} score")
        scores = {metric: round(score, 4)}
        if metric == "nima" and score < self.threshold:
            reason = f"low quality: nima {score:.2f} < {self.threshold:g}"
            return Verdict(passed=False, reason=reason, scores=scores)
        if metric == "brisque" and score > self.threshold:
            reason = f"low quality: brisque {score:.1f} > {self.threshold:g}"
            return Verdict(passed=False, reason=reason, scores=scores)
        return Verdict(passed=True, scores=scores)

    def describe(self):
        from importlib import metadata

        if self.options.metric == "brisque":
            return {"metric": "BRISQUE", "brisque": metadata.version("brisque")}
        return {
            "metric": "NIMA",
            "weights": str(self.options.weights),
            "timm": metadata.version("timm"),
        }

    def usage(self):
        return {"images": float(self.images)}

    def close(self) -> None:
        load_nima.cache_clear()


# --- smoke model -----------------------------------------------------------------


def write_smoke_nima(directory: Path, base_model: str = "test_efficientnet") -> Path:
    """A tiny NIMA checkpoint (timm's test EfficientNet backbone, random weights)."""
    network = nima_network(base_model, 10)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SMOKE_NIMA_FILE
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    metadata = {"base_model": base_model, "num_classes": "10"}
    save_safetensors(state, path, metadata)
    return path


@hookimpl
def register_filters(register):
    register(QualityFilter)
