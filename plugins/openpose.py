"""OpenPose (the body model) through controlnet_aux: the paper's pose filter.

The paper keeps an image when OpenPose finds one person with all the chosen joints
visible, and keeps the skeleton. controlnet_aux ships OpenPose's code but not its
weights: ``checkpoint`` names ``body_pose_model.pth`` (or a folder holding it), the
file ControlNet's annotators use, and controlnet_aux's own ``Body`` class loads it.

The filter decides from OpenPose's keypoints, never from a rendered map: the body
model's ``candidate``/``subset`` arrays become COCO-18 keypoints (pixel coordinates
of the original image, the heatmap peak as each joint's confidence), and the pose
plugin's ``decide_pose`` judges them, as it judges BlazePose's.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Literal

from pydantic import Field

from chatroom.components import Annotator, Filter, Options
from chatroom.errors import ConfigError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.plugins.pose import (
    COCO18,
    PoseFilter,
    PoseKeypoints,
    PoseKeypointsOptions,
    PoseOptions,
)
from chatroom.plugins.weights import checkpoint_file, torch_device, unreadable

log = logging.getLogger(__name__)

EXTRA = "pose"
BODY_FILE = "body_pose_model.pth"
MODEL = "OpenPose body (COCO-18, controlnet_aux)"
# Body's subset rows: 18 candidate indices (-1 for none), the total score, the count.
SCORE_COLUMN = 18

Keypoints = list[list[float]]


# --- OpenPose's arrays -> COCO-18 ----------------------------------------------------


def people_from_arrays(
    candidate, subset, scale_x: float = 1.0, scale_y: float = 1.0
) -> list[Keypoints]:
    """COCO-18 keypoints of every person in OpenPose's body output, best first.

    ``candidate`` rows are the peaks found (x, y, score, id); each ``subset`` row is
    one person: for each of the 18 joints the index of its peak in ``candidate`` (or
    -1), then the person's total score and joint count. OpenPose's body joints come
    in COCO-18 order already. A joint the person lacks is ``[0, 0, 0]`` (never
    visible). Coordinates are multiplied by ``scale_x``/``scale_y``, to go from the
    image the model saw back to the original one. People are sorted by total score.
    """
    people = []
    for row in sorted(subset, key=lambda r: -float(r[SCORE_COLUMN])):
        keypoints = []
        for index in row[: len(COCO18)]:
            index = int(index)
            if index < 0:
                keypoints.append([0.0, 0.0, 0.0])
                continue
            x, y, score = candidate[index][:3]
            keypoints.append(
                [
                    round(float(x) * scale_x, 2),
                    round(float(y) * scale_y, 2),
                    round(float(score), 4),
                ]
            )
        people.append(keypoints)
    return people


# --- the model -------------------------------------------------------------------


def body_checkpoint(value: str, where: str) -> Path:
    """The body model file that ``value`` names (the file, or a folder holding it)."""
    hint = (
        f"set checkpoint to OpenPose's {BODY_FILE} (ControlNet's annotator weights) "
        "or a folder holding it"
    )
    return checkpoint_file(value, where, BODY_FILE, hint)


class OpenPoseBody:
    """controlnet_aux's OpenPose body model, loaded on first use.

    ``find_people(image, limit)`` is the whole model step: usable on its own, for
    example to time the model per image.
    """

    model = MODEL

    def __init__(self, where: str, options):
        self.where = where
        self.options = options
        self._body = None
        self.path: Path | None = None

    def load(self):
        if self._body is not None:
            return self._body
        path = body_checkpoint(self.options.checkpoint, self.where)
        try:
            import torch  # noqa: F401

            # controlnet_aux imports all its detectors, which warn about timm's
            # moved modules and re-registered models: nothing a user can act on.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
                from controlnet_aux.open_pose.body import Body
        except ImportError as exc:
            raise MissingDependency(
                exc.name or "controlnet_aux", EXTRA, self.where
            ) from None
        try:
            body = Body(str(path))
        except KeyError as exc:
            if exc.args and isinstance(exc.args[0], str):  # a layer's name
                raise ConfigError(
                    f"{self.where}: checkpoint {str(path)!r} is not OpenPose's body "
                    f"model: it has no {exc.args[0]!r}"
                ) from None
            raise self._unreadable(path, exc) from None  # the unpickler's own
        except Exception as exc:  # text, HTML, a cut-off download: all unreadable
            raise self._unreadable(path, exc) from None
        body.to(torch_device(self.options.device))
        self._body, self.path = body, path
        log.info(
            "loaded OpenPose body model %s on %s",
            path,
            torch_device(self.options.device),
        )
        return body

    def _unreadable(self, path: Path, exc: Exception) -> ConfigError:
        return ConfigError(
            f"{self.where}: option 'checkpoint' = {str(path)!r} is not a torch "
            f"checkpoint ({unreadable(exc)}); expected OpenPose's {BODY_FILE}"
        )

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the model looks at: the shorter side at most detect_resolution."""
        limit = self.options.detect_resolution
        shorter = min(width, height)
        if shorter <= limit:
            return width, height
        factor = limit / shorter
        return max(1, round(width * factor)), max(1, round(height * factor))

    def find_people(self, image, limit: int) -> list[Keypoints]:
        """COCO-18 keypoints (original image pixels) of up to ``limit`` people."""
        import numpy as np
        import torch

        body = self.load()
        rgb = image.convert("RGB")
        width, height = rgb.size
        size = self.working_size(width, height)
        if size != rgb.size:
            from PIL import Image

            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        # OpenPose was trained on OpenCV's BGR images.
        bgr = np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])
        with torch.no_grad():
            candidate, subset = body(bgr)
        people = people_from_arrays(
            candidate, subset, width / size[0], height / size[1]
        )
        return people[:limit]

    def describe(self) -> dict:
        from importlib import metadata

        out = {"model": MODEL, "checkpoint": str(self.path or self.options.checkpoint)}
        try:
            out["controlnet_aux"] = metadata.version("controlnet_aux")
        except metadata.PackageNotFoundError:
            pass
        return out

    def close(self) -> None:
        self._body = None


# --- smoke checkpoint ------------------------------------------------------------


def body_model_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of OpenPose's body model, by its name in body_pose_model.pth.

    A VGG-19 front (to conv4_2) with two CPM layers, then six stages of two
    branches: L1 predicts the 38 part-affinity fields, L2 the 19 heatmaps. Stages 2
    to 6 read both branches of the stage before with the front's 128 features.
    """
    convs: list[tuple[str, int, int, int]] = []
    front = [
        ("conv1_1", 3, 64),
        ("conv1_2", 64, 64),
        ("conv2_1", 64, 128),
        ("conv2_2", 128, 128),
        ("conv3_1", 128, 256),
        ("conv3_2", 256, 256),
        ("conv3_3", 256, 256),
        ("conv3_4", 256, 256),
        ("conv4_1", 256, 512),
        ("conv4_2", 512, 512),
        ("conv4_3_CPM", 512, 256),
        ("conv4_4_CPM", 256, 128),
    ]
    convs += [(name, c_in, c_out, 3) for name, c_in, c_out in front]
    outputs = {"L1": 38, "L2": 19}
    for branch, c_out in outputs.items():
        convs += [(f"conv5_{i}_CPM_{branch}", 128, 128, 3) for i in (1, 2, 3)]
        convs.append((f"conv5_4_CPM_{branch}", 128, 512, 1))
        convs.append((f"conv5_5_CPM_{branch}", 512, c_out, 1))
    stage_input = 128 + sum(outputs.values())  # 185
    for stage in range(2, 7):
        for branch, c_out in outputs.items():
            name = f"stage{stage}_{branch}"
            convs.append((f"Mconv1_{name}", stage_input, 128, 7))
            convs += [(f"Mconv{i}_{name}", 128, 128, 7) for i in (2, 3, 4, 5)]
            convs.append((f"Mconv6_{name}", 128, 128, 1))
            convs.append((f"Mconv7_{name}", 128, c_out, 1))
    shapes: dict[str, tuple[int, ...]] = {}
    for name, c_in, c_out, kernel in convs:
        shapes[f"{name}.weight"] = (c_out, c_in, kernel, kernel)
        shapes[f"{name}.bias"] = (c_out,)
    return shapes


def write_smoke_checkpoint(path: str | Path, seed: int = 1234) -> Path:
    """Write a random-weight ``body_pose_model.pth`` with the published key names.

    The architecture is fixed, so the file is full size (about 200 MB). The last
    heatmap layer is pushed below OpenPose's peak threshold, so the random model
    finds nobody (and fast) instead of thousands of random peaks.
    """
    import torch

    path = Path(path)
    if path.suffix != ".pth":
        path = path / BODY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in body_model_shapes().items():
        if key.endswith(".weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            tensor = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            tensor = torch.zeros(shape)
        state[key] = tensor
    state["Mconv7_stage6_L2.weight"] *= 1e-3
    state["Mconv7_stage6_L2.bias"].fill_(-1.0)
    torch.save(state, str(path))
    return path


# --- the components ----------------------------------------------------------------


class OpenPoseModelOptions(Options):
    """Where the body model is and how it looks, for the filter and the annotator."""

    checkpoint: str = Field(
        "",
        description=f"OpenPose's {BODY_FILE}, or a folder holding it (ControlNet's "
        "annotator weights; not downloaded). The annotator loads it only when no pose "
        "filter passed keypoints on.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    detect_resolution: int = Field(
        512,
        ge=64,
        description="Larger images are scaled so their shorter side is this before "
        "the model looks; keypoints are given in the original image's pixels.",
    )


class OpenPoseOptions(OpenPoseModelOptions, PoseOptions):
    min_confidence: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="A joint is visible when inside the frame with a heatmap peak "
        "above this (OpenPose keeps peaks above 0.1).",
    )
    max_people: int = Field(
        16, ge=2, le=64, description="Judge at most this many people (best first)."
    )


class OpenPoseFilter(PoseFilter):
    name = "openpose"
    description = "one prominent person with the required joints visible (OpenPose)"
    Options = OpenPoseOptions
    cost = 0.5
    requires = (("controlnet_aux", "chatroom[pose]"),)

    def __init__(self, options, context):
        Filter.__init__(self, options, context)
        self.model = OpenPoseBody(f"filters ({self.name})", options)

    def describe(self):
        return self.model.describe()


class OpenPoseKeypointsOptions(OpenPoseModelOptions, PoseKeypointsOptions):
    min_confidence: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Joints at or below this heatmap peak are left out of the "
        "skeleton.",
    )


class OpenPoseKeypoints(PoseKeypoints):
    name = "openpose_keypoints"
    description = (
        "COCO-18 keypoints and a rendered skeleton (OpenPose), reusing a pose "
        "filter's keypoints"
    )
    Options = OpenPoseKeypointsOptions
    requires = (("controlnet_aux", "chatroom[pose]"),)

    def __init__(self, options, context):
        Annotator.__init__(self, options, context)
        self.model = OpenPoseBody(f"annotators ({self.name})", options)
        self.detected = 0

    def describe(self):
        return self.model.describe()


@hookimpl
def register_filters(register):
    register(OpenPoseFilter)


@hookimpl
def register_annotators(register):
    register(OpenPoseKeypoints)
