"""Pose: keep images of one prominent person whose chosen joints are visible.

The paper keeps an image when OpenPose finds one person with all the chosen joints.
This plugin makes that decision offline with MediaPipe's BlazePose, whose weights ship
inside the ``mediapipe`` wheel. BlazePose finds one person per pass, so the filter
finds the most prominent person, paints them out and looks again, until nobody is
left or ``max_people`` are found.

The decision itself, ``decide_pose``, is a pure function over COCO-18 keypoints
(OpenPose's order, pixel coordinates of the original image, a confidence per joint),
so it can judge keypoints from any pose model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import Field, field_validator

from chatroom.components import Annotator, Filter, Options, closest
from chatroom.errors import MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation, Verdict

log = logging.getLogger(__name__)

# OpenPose's COCO-18 joints, in order.
COCO18 = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
JOINT_GROUPS = {
    f"{part}s": (f"right_{part}", f"left_{part}")
    for part in ("shoulder", "elbow", "wrist", "hip", "knee", "ankle", "eye", "ear")
}
# Limbs of the rendered skeleton, as pairs of COCO-18 indices.
LIMBS = (
    (1, 2),
    (2, 3),
    (3, 4),
    (1, 5),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
)
# BlazePose's 33 landmarks -> COCO-18 (the neck, which BlazePose lacks, is the
# mid-point of the shoulders).
BLAZEPOSE_INDEX = {
    "nose": 0,
    "right_shoulder": 12,
    "right_elbow": 14,
    "right_wrist": 16,
    "left_shoulder": 11,
    "left_elbow": 13,
    "left_wrist": 15,
    "right_hip": 24,
    "right_knee": 26,
    "right_ankle": 28,
    "left_hip": 23,
    "left_knee": 25,
    "left_ankle": 27,
    "right_eye": 5,
    "left_eye": 2,
    "right_ear": 8,
    "left_ear": 7,
}
EXTRA = "offline"

Keypoints = Sequence[Sequence[float]]  # 18 x (x, y, confidence)


# --- the decision ----------------------------------------------------------------


def expand_joints(names: Sequence[str]) -> tuple[str, ...]:
    """Joint and group names (``ankles``) -> COCO-18 joint names, in COCO-18 order."""
    wanted: set[str] = set()
    for name in names:
        if name in JOINT_GROUPS:
            wanted.update(JOINT_GROUPS[name])
        elif name in COCO18:
            wanted.add(name)
        else:
            known = (*COCO18, *JOINT_GROUPS)
            raise ValueError(
                f"unknown joint {name!r}{closest(name, known)}; use COCO-18 names "
                f"({', '.join(COCO18)}) or groups ({', '.join(JOINT_GROUPS)})"
            )
    return tuple(j for j in COCO18 if j in wanted)


def is_visible(
    joint: Sequence[float], width: int, height: int, min_confidence: float
) -> bool:
    """A joint is visible when it lies inside the frame and is confident enough."""
    x, y, confidence = joint[0], joint[1], joint[2]
    return 0 <= x < width and 0 <= y < height and confidence > min_confidence


def visible_height(
    keypoints: Keypoints, width: int, height: int, min_confidence: float
) -> float:
    """The height in pixels spanned by a person's visible joints (0 with none)."""
    ys = [
        joint[1]
        for joint in keypoints
        if is_visible(joint, width, height, min_confidence)
    ]
    return max(ys) - min(ys) if ys else 0.0


@dataclass
class PoseDecision:
    """What ``decide_pose`` concluded; ``main`` indexes the main person, if any."""

    passed: bool
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    main: int | None = None


def decide_pose(
    people: Sequence[Keypoints],
    width: int,
    height: int,
    required: Sequence[str],
    min_confidence: float = 0.3,
    prominence: float = 0.5,
) -> PoseDecision:
    """Judge one image from the keypoints of every person found in it.

    The main person is the one whose visible joints span the most height. Another
    person counts only when prominent: their span is at least ``prominence`` times
    the main person's (a passer-by far behind does not count). The image passes
    with exactly one person counted and every ``required`` joint (names or groups,
    see ``expand_joints``) of the main person visible.
    """
    joints = expand_joints(required)
    spans = [visible_height(p, width, height, min_confidence) for p in people]
    scores: dict[str, float] = {"detected": float(len(people))}
    if not spans or max(spans) <= 0:
        scores["people"] = 0.0
        return PoseDecision(False, "no person found", scores)

    main = max(range(len(spans)), key=spans.__getitem__)
    counted = [s for s in spans if s >= prominence * spans[main]]
    scores["people"] = float(len(counted))
    scores["main_height"] = round(spans[main] / height, 4)
    others = [s for i, s in enumerate(spans) if i != main]
    scores["next_height_ratio"] = round(max(others) / spans[main], 4) if others else 0.0

    keypoints = people[main]
    missing = [
        name
        for name in joints
        if not is_visible(keypoints[COCO18.index(name)], width, height, min_confidence)
    ]
    scores["missing_joints"] = float(len(missing))
    scores.update({f"missing.{name}": 1.0 for name in missing})
    if len(counted) > 1:
        return PoseDecision(False, "more than one person", scores, main)
    if missing:
        names = ", ".join(name.replace("_", " ") for name in missing)
        return PoseDecision(
            False, f"required joints not visible: {names}", scores, main
        )
    return PoseDecision(True, "", scores, main)


# --- the model -------------------------------------------------------------------


class BlazePose:
    """MediaPipe BlazePose (full, ``model_complexity=1``) finding people one by one."""

    model = "mediapipe BlazePose full (model_complexity=1)"

    def __init__(self, component: str):
        self.component = component
        self._pose = None

    def _load(self):
        if self._pose is None:
            try:
                import mediapipe as mp
            except ImportError:
                raise MissingDependency("mediapipe", EXTRA, self.component) from None
            # complexity 1 ships inside the wheel; 0 and 2 would be downloaded
            self._pose = mp.solutions.pose.Pose(
                static_image_mode=True, model_complexity=1, enable_segmentation=False
            )
        return self._pose

    def find_people(self, image, limit: int) -> list[list[list[float]]]:
        """COCO-18 keypoints of up to ``limit`` people, the first found first.

        After each person their region (the box around all 33 landmarks, padded) is
        filled with the mean colour of the rest, and the model looks again. In a
        grey photo BlazePose's detector misses many people; when it finds nobody
        there, it looks again at a histogram-equalised copy.
        """
        import numpy as np

        pixels = np.array(image.convert("RGB"))
        people = self._search(pixels.copy(), limit)
        grey = (pixels[..., 0] == pixels[..., 1]).all() and (
            pixels[..., 1] == pixels[..., 2]
        ).all()
        if not people and grey:
            from PIL import Image, ImageOps

            equalised = ImageOps.equalize(Image.fromarray(pixels[..., 0]))
            people = self._search(np.array(equalised.convert("RGB")), limit)
        return people

    def _search(self, pixels, limit: int) -> list[list[list[float]]]:
        import numpy as np

        pose = self._load()
        height, width = pixels.shape[:2]
        people: list[list[list[float]]] = []
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(limit):
            found = pose.process(pixels)
            if not found.pose_landmarks:
                break
            landmarks = found.pose_landmarks.landmark
            xs = np.array([lm.x * width for lm in landmarks])
            ys = np.array([lm.y * height for lm in landmarks])
            box = _padded_box(xs, ys, width, height)
            if box is None or any(_iou(box, seen) > 0.5 for seen in boxes):
                break  # nothing in frame, or the same person again
            people.append(_to_coco18(landmarks, width, height))
            boxes.append(box)

            x0, y0, x1, y1 = box
            keep = np.ones((height, width), dtype=bool)
            keep[y0:y1, x0:x1] = False
            if not keep.any():
                break
            pixels[~keep] = pixels[keep].mean(axis=0).astype(np.uint8)
        return people

    def close(self) -> None:
        if self._pose is not None:
            self._pose.close()
            self._pose = None


def _to_coco18(landmarks, width: int, height: int) -> list[list[float]]:
    def joint(index: int) -> list[float]:
        lm = landmarks[index]
        return [lm.x * width, lm.y * height, lm.visibility]

    named = {name: joint(index) for name, index in BLAZEPOSE_INDEX.items()}
    right, left = named["right_shoulder"], named["left_shoulder"]
    named["neck"] = [
        (right[0] + left[0]) / 2,
        (right[1] + left[1]) / 2,
        min(right[2], left[2]),
    ]
    return [[round(v, 4) for v in named[name]] for name in COCO18]


def _padded_box(xs, ys, width: int, height: int):
    """The landmarks' box padded by 15% across and 10% down, clipped to the frame."""
    pad_x = (xs.max() - xs.min()) * 0.15
    pad_y = (ys.max() - ys.min()) * 0.10
    x0 = int(max(0, xs.min() - pad_x))
    x1 = int(min(width, xs.max() + pad_x + 1))
    y0 = int(max(0, ys.min() - pad_y))
    y1 = int(min(height, ys.max() + pad_y + 1))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def render_skeleton(keypoints: Keypoints, size: tuple[int, int], min_confidence=0.3):
    """The visible joints and limbs drawn on black, the size of the image (RGB)."""
    from PIL import Image, ImageDraw

    width, height = size
    canvas = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(size) / 128))
    shown = [is_visible(j, width, height, min_confidence) for j in keypoints]
    for number, (a, b) in enumerate(LIMBS):
        if shown[a] and shown[b]:
            hue = number / len(LIMBS)
            colour = tuple(round(255 * c) for c in _hue_to_rgb(hue))
            draw.line(
                [tuple(keypoints[a][:2]), tuple(keypoints[b][:2])],
                fill=colour,
                width=line,
            )
    for joint, ok in zip(keypoints, shown, strict=True):
        if ok:
            x, y = joint[0], joint[1]
            r = line + 1
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))
    return canvas


def _hue_to_rgb(hue: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(hue, 1.0, 1.0)


# --- the components ----------------------------------------------------------------


class PoseOptions(Options):
    required_joints: list[str] = Field(
        default_factory=lambda: ["shoulders", "hips"],
        description="Joints the main person must show: COCO-18 names (left_ankle) or "
        "groups (shoulders, elbows, wrists, hips, knees, ankles, eyes, ears).",
    )
    min_confidence: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="A joint is visible when inside the frame with a confidence "
        "(BlazePose visibility) above this.",
    )
    prominence: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Another person counts when their visible joints span at least "
        "this share of the main person's height; smaller people are passers-by.",
    )
    max_people: int = Field(
        4, ge=2, le=16, description="Stop looking for people after this many."
    )

    @field_validator("required_joints")
    @classmethod
    def _known_joints(cls, value: list[str]) -> list[str]:
        expand_joints(value)
        return value


class PeopleFilter(Filter):
    """A filter that finds the people in each image (BlazePose unless a subclass
    sets another finder as ``model``) and lets ``judge`` decide on them."""

    cost = 0.4
    requires = (("mediapipe", "chatroom[offline]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        self.model = BlazePose(self.name)

    def check(self, candidates) -> list[Verdict]:
        return [self._one(candidate.image) for candidate in candidates]

    def _one(self, image) -> Verdict:
        if image is None:
            return Verdict(passed=False, reason="no image")
        people = self.model.find_people(image, self.options.max_people)
        return self.judge(image, people)

    def judge(self, image, people: list[Keypoints]) -> Verdict:
        raise NotImplementedError  # pragma: no cover

    def describe(self):
        return {"model": self.model.model}

    def close(self) -> None:
        self.model.close()


class PoseFilter(PeopleFilter):
    name = "pose"
    description = "one prominent person with the required joints visible (BlazePose)"
    Options = PoseOptions

    def judge(self, image, people: list[Keypoints]) -> Verdict:
        options = self.options
        decision = decide_pose(
            people,
            image.width,
            image.height,
            options.required_joints,
            options.min_confidence,
            options.prominence,
        )
        artefacts = {"people": people, "image_size": [image.width, image.height]}
        if decision.main is not None:
            artefacts["keypoints"] = people[decision.main]
        return Verdict(
            passed=decision.passed,
            reason=decision.reason,
            scores=decision.scores,
            artefacts=artefacts,
        )


class PoseKeypointsOptions(Options):
    min_confidence: float = Field(
        0.3,
        ge=0,
        lt=1,
        description="Joints at or below this confidence are left out of the skeleton.",
    )
    skeleton: bool = Field(True, description="Also write the rendered skeleton.")


class PoseKeypoints(Annotator):
    name = "pose_keypoints"
    description = (
        "COCO-18 keypoints and a rendered skeleton, reusing the pose filter's keypoints"
    )
    Options = PoseKeypointsOptions
    requires = (("mediapipe", "chatroom[offline]"),)

    def __init__(self, options, context):
        super().__init__(options, context)
        self.model = BlazePose(self.name)
        self.detected = 0  # images the annotator had to run the model on itself

    def annotate(self, candidates, verdicts) -> list[Annotation]:
        return [
            self._one(candidate.image, received)
            for candidate, received in zip(candidates, verdicts, strict=True)
        ]

    def _one(self, image, verdicts) -> Annotation:
        keypoints = next(
            (v.artefacts["keypoints"] for v in verdicts if "keypoints" in v.artefacts),
            None,
        )
        if keypoints is None:
            # No pose filter ran: find the main person here.
            self.detected += 1
            people = self.model.find_people(image, 1)
            keypoints = people[0] if people else None
        if keypoints is None:
            return Annotation(rejected="no person for keypoints")
        masks = {}
        if self.options.skeleton:
            masks["skeleton"] = render_skeleton(
                keypoints, image.size, self.options.min_confidence
            )
        return Annotation(keypoints=[list(j) for j in keypoints], masks=masks)

    def usage(self):
        return {"detected": float(self.detected)} if self.detected else {}

    def close(self) -> None:
        self.model.close()


@hookimpl
def register_filters(register):
    register(PoseFilter)


@hookimpl
def register_annotators(register):
    register(PoseKeypoints)
