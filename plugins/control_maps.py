"""Control maps for ControlNet users: a Canny edge map and a depth map.

Both annotators write a grey PNG the size of the generated image beside its other
annotations (``masks/<id>/edges.png``, ``masks/<id>/depth.png``), ready to condition a
ControlNet (canny, depth) on the dataset.

- ``edge_map``: OpenCV's Canny detector, no model; 255 on edges.
- ``depth_map``: a transformers depth-estimation model (Depth Anything, DPT: anything
  ``AutoModelForDepthEstimation`` loads) from a local folder or a Hub id already in
  the local cache. The relative depth is scaled to 0-255 per image, near bright, as
  ControlNet's depth models expect.

``write_tiny_depth_model`` writes a tiny random-weight Depth Anything (a small DINOv2
backbone and DPT head) for smoke runs and tests.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from chatroom.components import Annotator, Options
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation
from chatroom.plugins.weights import device_and_dtype

log = logging.getLogger(__name__)

DEFAULT_DEPTH_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


# --- edges ---------------------------------------------------------------------------


class EdgeMapOptions(Options):
    low_threshold: int = Field(
        100, ge=0, le=255, description="Canny's lower hysteresis threshold."
    )
    high_threshold: int = Field(
        200, ge=0, le=255, description="Canny's upper hysteresis threshold."
    )
    blur: int = Field(
        0,
        ge=0,
        le=31,
        description="Gaussian blur kernel (pixels, odd) before Canny; 0 for none.",
    )

    @model_validator(mode="after")
    def _ordered(self):
        if self.low_threshold > self.high_threshold:
            raise ValueError("low_threshold must not exceed high_threshold")
        if self.blur and self.blur % 2 == 0:
            raise ValueError("blur must be an odd kernel size (or 0)")
        return self


def edge_map(image, options: EdgeMapOptions):
    """Canny edges of a PIL image as a mode-"L" image of the same size."""
    import numpy as np
    from PIL import Image

    try:
        import cv2
    except ImportError:
        raise MissingDependency(
            "opencv-contrib-python", "offline", "edge_map"
        ) from None
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    if options.blur:
        grey = cv2.GaussianBlur(grey, (options.blur, options.blur), 0)
    edges = cv2.Canny(grey, options.low_threshold, options.high_threshold)
    return Image.fromarray(edges)


class EdgeMap(Annotator):
    name = "edge_map"
    description = "Canny edge map for ControlNet (OpenCV, no model)"
    Options = EdgeMapOptions
    requires = (("cv2", "chatroom[offline]"),)

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Annotation:
        import numpy as np

        if image is None:
            return Annotation(rejected="no image")
        edges = edge_map(image, self.options)
        density = float((np.asarray(edges) > 0).mean())
        return Annotation(
            masks={"edges": edges}, qa={"edge_density": round(density, 4)}
        )

    def describe(self):
        return {"method": "OpenCV Canny"}


# --- depth ---------------------------------------------------------------------------


class DepthMapOptions(Options):
    model: str = Field(
        DEFAULT_DEPTH_MODEL,
        description="A local depth-estimation folder (Depth Anything, DPT), or a Hub "
        "id already in the local cache.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16"] = "auto"
    batch_size: int = Field(4, ge=1, description="Images through the model at once.")
    local_files_only: bool = True


class DepthMap(Annotator):
    name = "depth_map"
    description = "relative depth map for ControlNet (transformers depth estimation)"
    Options = DepthMapOptions
    requires = (
        ("torch", "chatroom[transformers]"),
        ("transformers", "chatroom[transformers]"),
    )

    def __init__(self, options, context):
        super().__init__(options, context)
        self._source = self._find_source()
        self._model = None
        self._processor = None
        self.images = 0

    def _find_source(self) -> str:
        """A local folder, or a Hub id whose config is in the local cache."""
        model = self.options.model
        path = Path(model).expanduser()
        expected = (
            "expected a transformers depth-estimation folder (config.json, "
            "preprocessor_config.json and the weights) or a Hub id in the local cache"
        )
        if path.is_dir() and not (path / "config.json").is_file():
            raise ConfigError(
                f"annotators ({self.name}): option 'model' = {model!r} is a folder "
                f"without config.json; {expected}"
            )
        if path.is_dir():
            return str(path)
        if path.is_file():
            raise ConfigError(
                f"annotators ({self.name}): option 'model' = {model!r} is a file, "
                f"not a folder; {expected}"
            )
        if path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1:
            raise ConfigError(
                f"annotators ({self.name}): model folder {model!r} does not exist"
            )
        if self.options.local_files_only and not _in_cache(model):
            raise ConfigError(
                f"annotators ({self.name}): model {model!r} is not in the local "
                "cache; set annotators.depth_map.model to a local folder"
            )
        return model

    def _load(self):
        if self._model is not None:
            return self._processor, self._model
        try:
            import torch
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        except ImportError as exc:
            raise MissingDependency(
                exc.name or "transformers", "transformers", self.name
            ) from None
        device, dtype = device_and_dtype(self.options.device, self.options.dtype)
        started = time.perf_counter()
        local = self.options.local_files_only
        try:
            processor = AutoImageProcessor.from_pretrained(
                self._source, local_files_only=local
            )
            model = AutoModelForDepthEstimation.from_pretrained(
                self._source, local_files_only=local
            )
        except Exception as exc:  # a garbled config or weights: the setting is wrong
            lines = str(exc).strip().splitlines()
            why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            raise ConfigError(
                f"annotators ({self.name}): option 'model' = {self._source!r}: "
                f"cannot load depth model ({why})"
            ) from None
        model.to(device=device, dtype=getattr(torch, dtype))
        model.eval()
        self._processor, self._model = processor, model
        log.info(
            "loaded depth model %s on %s (%s) in %.1f s",
            self._source,
            device,
            dtype,
            time.perf_counter() - started,
        )
        return processor, model

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        images = [candidate.image for candidate in candidates]
        maps = self.depth_maps([image for image in images if image is not None])
        found = iter(maps)
        return [
            Annotation(rejected="no image")
            if image is None
            else Annotation(masks={"depth": next(found)})
            for image in images
        ]

    def depth_maps(self, images: list) -> list[Any]:
        """One mode-"L" depth map per image, each the size of its image, near bright."""
        import torch

        processor, model = self._load()
        pixels = [
            processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
            for image in images
        ]
        # images of one shape go through the model together
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, tensor in enumerate(pixels):
            by_shape.setdefault(tuple(tensor.shape), []).append(index)
        out: list[Any] = [None] * len(images)
        size = self.options.batch_size
        for indices in by_shape.values():
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                batch = torch.cat([pixels[i] for i in chunk])
                batch = batch.to(model.device, model.dtype)
                with torch.inference_mode():
                    predicted = model(pixel_values=batch).predicted_depth
                for i, depth in zip(chunk, predicted, strict=True):
                    out[i] = _to_image(depth, images[i].size)
        self.images += len(images)
        return out

    def describe(self):
        info: dict[str, Any] = {"model": self.options.model}
        if self._model is not None:
            info["architecture"] = type(self._model).__name__
        return info

    def usage(self):
        return {"images": float(self.images)} if self.images else {}

    def close(self) -> None:
        self._model = None
        self._processor = None


def _in_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _to_image(depth, size: tuple[int, int]):
    """A (h, w) depth tensor, resized to ``size`` (w, h) and scaled to 0-255."""
    import numpy as np
    import torch
    from PIL import Image

    width, height = size
    resized = torch.nn.functional.interpolate(
        depth[None, None].float(), size=(height, width), mode="bicubic"
    )[0, 0]
    values = resized.cpu().numpy()
    low, high = float(values.min()), float(values.max())
    if not np.isfinite([low, high]).all() or high <= low:
        return Image.new("L", size, 0)
    scaled = (values - low) / (high - low) * 255.0
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8))


def write_tiny_depth_model(directory: str | Path) -> Path:
    """A tiny random-weight Depth Anything and its processor, in ``directory``.

    Loads with ``AutoModelForDepthEstimation`` and ``AutoImageProcessor`` like the
    real Depth Anything V2 folders (DINOv2 backbone, DPT neck and head); the caller
    seeds torch for identical files.
    """
    try:
        from transformers import (
            DepthAnythingConfig,
            DepthAnythingForDepthEstimation,
            Dinov2Config,
            DPTImageProcessor,
        )
    except ImportError as exc:
        raise MissingDependency(
            exc.name or "transformers", "transformers", "tiny depth model"
        ) from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone = Dinov2Config(
        image_size=56,
        patch_size=14,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        out_indices=[1, 2, 3, 4],
        reshape_hidden_states=False,
        initializer_range=0.1,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 16, 16, 16],
        fusion_hidden_size=16,
        head_hidden_size=8,
        # the default scale leaves a tiny random head's output near zero everywhere
        initializer_range=0.1,
    )
    model = DepthAnythingForDepthEstimation(config).eval()
    # Depth Anything V2's preprocessing, at a tiny size
    processor = DPTImageProcessor(
        do_resize=True,
        size={"height": 56, "width": 56},
        keep_aspect_ratio=True,
        ensure_multiple_of=14,
        resample=3,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_pad=False,
    )
    model.save_pretrained(str(directory), safe_serialization=True)
    processor.save_pretrained(str(directory))
    return directory


@hookimpl
def register_annotators(register):
    register(EdgeMap)
    register(DepthMap)
