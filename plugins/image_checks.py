"""A filter that rejects blank, NaN and near-constant images.

Cheap and model-free, so it runs first; it decides even in smoke runs, where the
filters that judge content only observe.
"""

from __future__ import annotations

from pydantic import Field

from chatroom.components import Filter, Options
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict


class ImageCheckOptions(Options):
    min_std: float = Field(
        2.0,
        ge=0,
        description="Reject when the pixel standard deviation (0-255) is lower.",
    )
    max_flat_share: float = Field(
        0.98,
        gt=0,
        le=1,
        description="Reject when one grey level covers more than this share of pixels.",
    )


class ImageChecks(Filter):
    name = "image_checks"
    description = "rejects missing, NaN, blank and near-constant images"
    Options = ImageCheckOptions
    cost = 0.01

    def check(self, candidates) -> list[Verdict]:
        return [self._one(c.image) for c in candidates]

    def _one(self, image) -> Verdict:
        import numpy as np

        if image is None:
            return Verdict(filter=self.name, passed=False, reason="no image")
        arr = np.asarray(image, dtype=np.float32)
        if arr.size == 0:
            return Verdict(filter=self.name, passed=False, reason="empty image")
        if not np.isfinite(arr).all():
            return Verdict(
                filter=self.name, passed=False, reason="NaN or infinite pixels"
            )
        std = float(arr.std())
        grey = arr.mean(axis=-1) if arr.ndim == 3 else arr
        counts = np.bincount(
            np.clip(grey, 0, 255).astype(np.uint8).ravel(), minlength=256
        )
        flat = float(counts.max() / counts.sum())
        scores = {"std": round(std, 3), "flat_share": round(flat, 4)}
        if std < self.options.min_std:
            level = (
                "black" if arr.mean() < 8 else "white" if arr.mean() > 247 else "flat"
            )
            return Verdict(
                filter=self.name,
                passed=False,
                scores=scores,
                reason=f"near-constant {level} image",
            )
        if flat > self.options.max_flat_share:
            return Verdict(
                filter=self.name,
                passed=False,
                scores=scores,
                reason="most pixels share one grey level",
            )
        return Verdict(filter=self.name, passed=True, scores=scores)


@hookimpl
def register_filters(register):
    register(ImageChecks)
