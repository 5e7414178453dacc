"""One main object on a clean background: a filter and an object mask (OpenCV, CPU).

Product photos of furniture show one whole object on a plain backdrop. Both
components here measure that classically, with no model weights:

- the background colour is the median of a strip around the image border, and the
  border's *uniformity* is the share of that strip close to it (in CIELAB);
- pixels far from the background colour seed OpenCV's GrabCut, whose foreground,
  closed and split into connected components, is the object mask; the largest
  component is the main object, and it must *dominate* the rest;
- the spectral-residual saliency map (``cv2.saliency``) and the edge density of the
  border are recorded beside the decision, as evidence.

``measure_object`` is a pure function over a PIL image, so the filter and the
annotator compute the same mask; the filter records the scores, the annotator
writes the mask (``masks/<id>/object.png``, 255 on the object, the image's size).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field

from chatroom.components import Annotator, Filter, Options
from chatroom.errors import MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation, Verdict

log = logging.getLogger(__name__)

EXTRA = "offline"  # opencv-contrib comes with mediapipe


def _cv2(component: str):
    try:
        import cv2
    except ImportError:
        raise MissingDependency("opencv-contrib-python", EXTRA, component) from None
    return cv2


# --- the measurement ---------------------------------------------------------------


class MeasureOptions(Options):
    analysis_size: int = Field(
        320,
        ge=64,
        le=2048,
        description="The image is measured at this longest side (pixels); the mask "
        "is scaled back to the original size.",
    )
    border: float = Field(
        0.04,
        gt=0,
        lt=0.25,
        description="Width of the border strip, as a share of the shorter side.",
    )
    colour_tolerance: float = Field(
        14.0,
        gt=0,
        description="CIELAB distance (8-bit scale) within which a pixel has the "
        "background colour.",
    )
    grabcut_iterations: int = Field(
        3, ge=0, le=10, description="GrabCut refinement passes (0: colour only)."
    )


@dataclass
class ObjectMeasures:
    """What ``measure_object`` found; ``mask`` is the main object at analysis size."""

    scores: dict[str, float]
    mask: Any = None  # numpy bool array, or None when nothing stands out
    components: list[int] = field(default_factory=list)  # areas, largest first


def measure_object(
    image, options: MeasureOptions, component: str = ""
) -> ObjectMeasures:
    """Measure background, object mask and dominance of one image."""
    import numpy as np

    cv2 = _cv2(component or "object measures")
    rgb = np.asarray(image.convert("RGB"))
    height, width = rgb.shape[:2]
    scale = min(1.0, options.analysis_size / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    h, w = rgb.shape[:2]

    # the background: the median colour of the border strip, and how much agrees
    strip = max(2, round(options.border * min(h, w)))
    border = np.zeros((h, w), dtype=bool)
    border[:strip] = border[-strip:] = True
    border[:, :strip] = border[:, -strip:] = True
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float32)
    background = np.median(lab[border], axis=0)
    distance = np.linalg.norm(lab - background, axis=-1)
    near = distance <= options.colour_tolerance
    scores: dict[str, float] = {
        "border_uniformity": float(near[border].mean()),
        "border_std": float(lab[border].std(axis=0).mean()),
    }
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, 100, 200) > 0
    scores["border_edges"] = float(edges[border].mean())
    scores["edge_density"] = float(edges.mean())

    # the object: far from the background colour, refined by GrabCut
    seed = ~near
    if not seed.any() or seed.all():
        scores.update(object_share=float(seed.mean()), dominance=0.0)
        scores.update(second_ratio=0.0, components=0.0, cut_sides=0.0)
        return ObjectMeasures(_rounded(scores))
    mask = seed
    if options.grabcut_iterations:
        labels = np.where(seed, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
        labels[border & near] = cv2.GC_BGD
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        models = (np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64))
        try:
            cv2.grabCut(
                bgr,
                labels,
                None,
                *models,
                options.grabcut_iterations,
                cv2.GC_INIT_WITH_MASK,
            )
            mask = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        except cv2.error as exc:  # too few samples of one kind: keep the colour mask
            log.debug("grabcut skipped: %s", str(exc).splitlines()[0])
    side = max(3, round(0.02 * min(h, w)) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel) > 0

    # the components: the largest must dominate
    count, labelled, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    areas = sorted(
        ((int(stats[i, cv2.CC_STAT_AREA]), i) for i in range(1, count)), reverse=True
    )
    total = sum(area for area, _ in areas)
    largest, index = areas[0] if areas else (0, 0)
    main = labelled == index if areas else np.zeros_like(mask)
    second = areas[1][0] if len(areas) > 1 else 0
    minor = 0.05 * largest
    scores["object_share"] = float(total / mask.size)
    scores["dominance"] = float(largest / total) if total else 0.0
    scores["second_ratio"] = float(second / largest) if largest else 0.0
    scores["components"] = float(sum(1 for area, _ in areas if area >= minor))
    scores["cut_sides"] = float(
        sum(bool(edge.any()) for edge in (main[0], main[-1], main[:, 0], main[:, -1]))
    )
    contrast = _saliency_contrast(cv2, rgb, main)
    if contrast is not None:
        scores["saliency_contrast"] = contrast
    return ObjectMeasures(
        _rounded(scores), main if largest else None, [a for a, _ in areas]
    )


def _saliency_contrast(cv2, rgb, main) -> float | None:
    """Mean spectral-residual saliency on the object minus off it, when available."""
    # the saliency module is in opencv-contrib only; a plain opencv shadows it
    make = getattr(
        getattr(cv2, "saliency", None), "StaticSaliencySpectralResidual_create", None
    )
    if make is None or main.all() or not main.any():
        return None
    ok, saliency = make().computeSaliency(rgb)
    if not ok:
        return None
    return float(saliency[main].mean() - saliency[~main].mean())


def _rounded(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in scores.items()}


def full_size_mask(measures: ObjectMeasures, size: tuple[int, int]):
    """The main object as a mode-"L" PIL image of ``size``: 255 on it, 0 elsewhere."""
    import numpy as np
    from PIL import Image

    if measures.mask is None:
        return Image.new("L", size, 0)
    small = Image.fromarray(measures.mask.astype(np.uint8) * 255)
    if small.size == size:
        return small
    scaled = np.asarray(small.resize(size, Image.Resampling.BILINEAR))
    return Image.fromarray(((scaled >= 128) * 255).astype(np.uint8))


# --- the filter --------------------------------------------------------------------


class SingleObjectOptions(MeasureOptions):
    min_border_uniformity: float = Field(
        0.9,
        ge=0,
        le=1,
        description="Reject when less of the border strip than this has the "
        "background colour (a busy or cluttered background).",
    )
    min_object_share: float = Field(
        0.03,
        ge=0,
        lt=1,
        description="Reject when the object mask covers less of the image than this.",
    )
    max_object_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Reject when the object mask covers more of the image than this "
        "(no background left).",
    )
    min_dominance: float = Field(
        0.85,
        ge=0,
        le=1,
        description="Reject when the largest component holds less than this share of "
        "the object mask.",
    )
    max_second_ratio: float = Field(
        0.25,
        ge=0,
        le=1,
        description="Reject when the second-largest component is larger than this "
        "share of the largest (two objects).",
    )
    max_cut_sides: int = Field(
        1,
        ge=0,
        le=4,
        description="Reject when the main object touches more image sides than this "
        "(cut off by the frame); one allows an object standing on the bottom edge.",
    )


def decide_object(scores: dict[str, float], options: SingleObjectOptions) -> str:
    """The reason to reject, or '' to keep, from ``measure_object``'s scores."""
    if scores["border_uniformity"] < options.min_border_uniformity:
        return "background is not plain"
    if scores["object_share"] < options.min_object_share:
        return "no main object"
    if scores["object_share"] > options.max_object_share:
        return "object fills the frame"
    if scores["second_ratio"] > options.max_second_ratio:
        return "more than one object"
    if scores["dominance"] < options.min_dominance:
        return "no dominant object"
    if scores["cut_sides"] > options.max_cut_sides:
        return "object cut off by the frame"
    return ""


class SingleObjectFilter(Filter):
    name = "single_object"
    description = "one main object on a plain background (OpenCV, no model)"
    Options = SingleObjectOptions
    cost = 0.05
    requires = (("cv2", "chatroom[offline]"),)

    def check(self, candidates) -> list[Verdict]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Verdict:
        if image is None:
            return Verdict(passed=False, reason="no image")
        measures = measure_object(image, self.options, self.name)
        reason = decide_object(measures.scores, self.options)
        return Verdict(passed=not reason, reason=reason, scores=measures.scores)

    def describe(self):
        cv2 = _cv2(self.name)
        return {
            "method": "border colour + GrabCut components",
            "opencv": cv2.__version__,
        }


# --- the annotator -----------------------------------------------------------------


class ObjectMaskOptions(MeasureOptions):
    min_share: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="Reject the image when the mask covers less of it than this.",
    )


class ObjectMask(Annotator):
    name = "object_mask"
    description = "binary mask of the main object (OpenCV GrabCut, no model)"
    Options = ObjectMaskOptions
    requires = (("cv2", "chatroom[offline]"),)

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Annotation:
        import numpy as np

        if image is None:
            return Annotation(rejected="no image")
        measures = measure_object(image, self.options, self.name)
        mask = full_size_mask(measures, image.size)
        share = float((np.asarray(mask) > 0).mean())
        qa = {"object_share": round(share, 4)}
        if share < self.options.min_share:
            return Annotation(rejected="object mask is empty", qa=qa)
        return Annotation(masks={"object": mask}, qa=qa)

    def describe(self):
        cv2 = _cv2(self.name)
        return {
            "method": "border colour + GrabCut components",
            "opencv": cv2.__version__,
        }


@hookimpl
def register_filters(register):
    register(SingleObjectFilter)


@hookimpl
def register_annotators(register):
    register(ObjectMask)
