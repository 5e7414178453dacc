"""An offline NSFW filter: NudeNet's detector of exposed body parts (ONNX, CPU).

The paper filters with a CLIP-based NSFW detector; NudeNet's weights ship inside its
wheel, so this one runs with no download. Every verdict records, for each label the
config names, the highest score the detector gave it (0 when it found none).

The labels in ``thresholds`` are checked against the model's own label set when the
filter is built: a label the model does not know would silently never fire, so a
mismatch stops the run instead (fail closed).
"""

from __future__ import annotations

import ast
import logging

from pydantic import Field

from chatroom.components import Filter, Options, closest
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Verdict

log = logging.getLogger(__name__)

EXTRA = "offline"
DEFAULT_THRESHOLDS = {
    "FEMALE_BREAST_EXPOSED": 0.5,
    "FEMALE_GENITALIA_EXPOSED": 0.4,
    "MALE_GENITALIA_EXPOSED": 0.4,
    "BUTTOCKS_EXPOSED": 0.5,
    "ANUS_EXPOSED": 0.4,
}


class NudeNetOptions(Options):
    thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_THRESHOLDS),
        description="NudeNet label -> score at or above which an image is rejected. "
        "Covered parts, faces, feet, bellies and armpits are left out by default.",
    )
    batch_size: int = Field(4, ge=1, description="Images handed to the filter at once.")


def model_labels(detector) -> list[str]:
    """The label of each class id, read from the ONNX model's own metadata."""
    meta = detector.onnx_session.get_modelmeta().custom_metadata_map
    try:
        names = ast.literal_eval(meta["names"])
        return [names[i] for i in range(len(names))]
    except (KeyError, ValueError, SyntaxError):
        raise ConfigError(
            "nudenet: the model carries no label names; cannot check the thresholds"
        ) from None


def library_labels() -> list[str]:
    """The labels the nudenet library maps class ids to."""
    from nudenet import nudenet

    return list(getattr(nudenet, "__labels"))


class NudeNetFilter(Filter):
    name = "nudenet"
    description = "rejects images NudeNet finds exposed body parts in (offline NSFW)"
    Options = NudeNetOptions
    cost = 0.3
    requires = (("nudenet", "chatroom[offline]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        for label, threshold in options.thresholds.items():
            if not 0 < threshold <= 1:
                raise ConfigError(
                    f"filters (nudenet): thresholds.{label} = {threshold!r}: "
                    "expected a score in (0, 1]"
                )
        self.detector = self._load()
        self.labels = self._check_labels()
        self.images = 0

    def _load(self):
        try:
            from nudenet import NudeDetector
        except ImportError:
            raise MissingDependency("nudenet", EXTRA, self.name) from None
        return NudeDetector()

    def _check_labels(self) -> list[str]:
        labels = model_labels(self.detector)
        if labels != library_labels():
            raise ConfigError(
                "nudenet: the model's labels and the library's differ; reinstall "
                "nudenet (a mismatch would put the wrong names on detections)"
            )
        unknown = [label for label in self.options.thresholds if label not in labels]
        if unknown:
            first = unknown[0]
            raise ConfigError(
                f"filters (nudenet): thresholds names {first!r}, which the model does "
                f"not detect{closest(first, labels)}; known: {', '.join(labels)}"
            )
        return labels

    def check(self, candidates) -> list[Verdict]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Verdict:
        import numpy as np

        if image is None:
            return Verdict(passed=False, reason="no image")
        # the library reads files with OpenCV: hand it the same BGR layout
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        detections = self.detector.detect(bgr)
        self.images += 1

        thresholds = self.options.thresholds
        best = dict.fromkeys(thresholds, 0.0)
        for detection in detections:
            label = detection["class"]
            if label in best:
                best[label] = max(best[label], float(detection["score"]))
        scores = {label.lower(): round(score, 4) for label, score in best.items()}
        flagged = [label for label, score in best.items() if score >= thresholds[label]]
        if flagged:
            parts = ", ".join(label.lower().replace("_", " ") for label in flagged)
            return Verdict(passed=False, reason=f"nsfw: {parts}", scores=scores)
        return Verdict(passed=True, scores=scores)

    def describe(self):
        from importlib import metadata

        return {
            "model": "NudeNet 320n detector (ONNX)",
            "nudenet": metadata.version("nudenet"),
        }

    def usage(self):
        return {"images": float(self.images)}

    def close(self) -> None:
        self.detector = None


@hookimpl
def register_filters(register):
    register(NudeNetFilter)
