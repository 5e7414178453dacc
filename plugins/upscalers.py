"""Model upscalers for the hires fix (ESRGAN, Real-ESRGAN and kin), through spandrel.

spandrel recognises the architecture from the weights' key layout, so one loader
reads "R-ESRGAN 4x+" (RealESRGAN_x4plus), "4x-UltraSharp" and the other models the
WebUI offers. Upscaling follows the WebUI: apply the model (up to three times) until
the image is at least the target size, then resize to the target with Lanczos; a 4x
model asked for x2 upscales 4x and then halves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from chatroom.errors import ConfigError, MissingDependency

log = logging.getLogger(__name__)

PICKLED = (".ckpt", ".pt", ".pth", ".bin")
MAX_PASSES = 3


def load_state_dict(path: Path, allow_pickle: bool, option: str) -> dict[str, Any]:
    """Read weights from ``.safetensors``, or from a pickle when allowed."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if suffix in PICKLED:
        if not allow_pickle:
            raise ConfigError(
                f"{option}: {path.name} is a pickled file, which can run code when "
                "loaded; convert it to .safetensors, or set generator.allow_pickle "
                "= true if you trust it"
            )
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        # BasicSR checkpoints (Real-ESRGAN) keep the weights under one of these.
        for key in ("params_ema", "params", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                return state[key]
        return state
    raise ConfigError(
        f"{option}: {path.name} is neither .safetensors nor a known pickle "
        f"({', '.join(PICKLED)})"
    )


class ModelUpscaler:
    """An image-to-image super-resolution model from a weights file."""

    def __init__(
        self,
        path: str,
        allow_pickle: bool = False,
        device: str = "cpu",
        dtype=None,
        option: str = "upscaler_model",
    ):
        self.path = Path(path).expanduser()
        self.allow_pickle = allow_pickle
        self.device = device
        self.dtype = dtype
        self.option = option
        self.model = None

    def load(self):
        if self.model is not None:
            return self.model
        try:
            import spandrel
        except ImportError:
            raise MissingDependency(
                "spandrel", "diffusers", "hires upscaler models"
            ) from None
        if not self.path.is_file():
            raise ConfigError(
                f"{self.option}: {str(self.path)!r} does not exist; give the "
                "upscaler's weights file, e.g. RealESRGAN_x4plus.safetensors"
            )
        state = load_state_dict(self.path, self.allow_pickle, self.option)
        try:
            descriptor = spandrel.ModelLoader().load_from_state_dict(state)
        except (spandrel.UnsupportedModelError, RuntimeError, KeyError) as exc:
            raise ConfigError(
                f"{self.option}: {self.path.name} is not an upscaler architecture "
                f"spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, ...): {exc}"
            ) from None
        if not isinstance(descriptor, spandrel.ImageModelDescriptor):
            raise ConfigError(f"{self.option}: {self.path.name} is not an upscaler")
        descriptor.to(self.device).eval()
        half = self.dtype is not None and str(self.dtype) == "torch.float16"
        if half and getattr(descriptor, "supports_half", False):
            descriptor.half()
        self.model = descriptor
        log.info(
            "loaded upscaler %s (%s, x%d)",
            self.path.name,
            descriptor.architecture.name,
            descriptor.scale,
        )
        return descriptor

    def upscale(self, images: list, size: tuple[int, int]) -> list:
        """Upscale PIL images to ``size`` (width, height) the WebUI's way."""
        from PIL import Image

        model = self.load()
        out = []
        for image in images:
            for _ in range(MAX_PASSES):
                if image.width >= size[0] and image.height >= size[1]:
                    break
                before = image.size
                image = self._apply(model, image)
                if image.size == before:
                    break
            if image.size != size:
                image = image.resize(size, Image.LANCZOS)
            out.append(image)
        return out

    def _apply(self, model, image):
        import numpy as np
        import torch
        from PIL import Image

        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        tensor = tensor.to(device=model.device, dtype=model.dtype)
        result = model(tensor)[0].float().clamp(0, 1)
        pixels = (result.permute(1, 2, 0).cpu().numpy() * 255.0).round()
        return Image.fromarray(pixels.astype(np.uint8))
