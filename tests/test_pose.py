"""The pose rule: a pure decision over keypoints, then BlazePose on real photos."""

import pytest
from conftest import candidate
from PIL import Image, ImageOps

from chatroom.components import Context, validate_options
from chatroom.errors import ConfigError
from chatroom.models import Verdict
from chatroom.plugins.pose import (
    COCO18,
    PoseFilter,
    PoseKeypoints,
    decide_pose,
    expand_joints,
    render_skeleton,
)

FASHION = ["shoulders", "hips", "ankles"]
W, H = 512, 768


def person(x=256.0, top=60.0, height=640.0, scale=1.0, confidence=0.95, **override):
    """COCO-18 keypoints of a standing person: head at ``top``, ankles at the bottom."""
    h = height * scale
    half = 40 * scale
    rows = {
        "nose": (x, top),
        "neck": (x, top + 0.14 * h),
        "right_shoulder": (x - half, top + 0.15 * h),
        "right_elbow": (x - half - 5, top + 0.33 * h),
        "right_wrist": (x - half - 5, top + 0.48 * h),
        "left_shoulder": (x + half, top + 0.15 * h),
        "left_elbow": (x + half + 5, top + 0.33 * h),
        "left_wrist": (x + half + 5, top + 0.48 * h),
        "right_hip": (x - half / 2, top + 0.5 * h),
        "right_knee": (x - half / 2, top + 0.74 * h),
        "right_ankle": (x - half / 2, top + h),
        "left_hip": (x + half / 2, top + 0.5 * h),
        "left_knee": (x + half / 2, top + 0.74 * h),
        "left_ankle": (x + half / 2, top + h),
        "right_eye": (x - 8 * scale, top - 8 * scale),
        "left_eye": (x + 8 * scale, top - 8 * scale),
        "right_ear": (x - 16 * scale, top - 4 * scale),
        "left_ear": (x + 16 * scale, top - 4 * scale),
    }
    points = {name: [*xy, confidence] for name, xy in rows.items()}
    for name, value in override.items():
        points[name] = list(value)
    return [points[name] for name in COCO18]


def decide(people, **kwargs):
    return decide_pose(people, W, H, kwargs.pop("required", FASHION), **kwargs)


# --- the pure decision -------------------------------------------------------------


def test_one_full_body_person_passes():
    decision = decide([person()])

    assert decision.passed and decision.main == 0
    assert decision.scores["people"] == 1 and decision.scores["missing_joints"] == 0
    assert decision.scores["main_height"] == pytest.approx(648 / H, abs=1e-3)


def test_a_small_person_in_the_background_does_not_count():
    passer_by = person(x=60, top=200, scale=0.35)

    decision = decide([passer_by, person()])

    assert decision.passed and decision.main == 1
    assert decision.scores["detected"] == 2 and decision.scores["people"] == 1
    assert 0 < decision.scores["next_height_ratio"] < 0.5


def test_two_people_side_by_side_are_rejected():
    decision = decide([person(x=128), person(x=384, top=80, scale=0.95)])

    assert not decision.passed
    assert decision.reason == "more than one person"
    assert decision.scores["people"] == 2


def test_prominence_is_configurable():
    people = [person(), person(x=60, top=300, scale=0.4)]

    assert decide(people).passed
    assert not decide(people, prominence=0.3).passed


def test_a_crop_above_the_knees_misses_the_ankles():
    # the frame ends above the knees: the model still guesses ankles below it
    cropped = [[x, y, c] for x, y, c in person(top=60, height=1100)]

    decision = decide([cropped])

    assert not decision.passed
    assert decision.reason == "required joints not visible: right ankle, left ankle"
    assert decision.scores["missing.right_ankle"] == 1
    assert decision.scores["missing.left_ankle"] == 1
    assert "missing.right_knee" not in decision.scores


def test_head_and_knees_are_not_required_by_the_fashion_rule():
    hidden = {
        name: (0, 0, 0.01)
        for name in ("nose", "right_eye", "left_eye", "right_knee", "left_knee")
    }
    hidden["right_ear"] = (-5, 10, 0.9)  # outside the frame

    assert decide([person(**hidden)]).passed
    assert not decide([person(**hidden)], required=["knees"]).passed


def test_a_joint_is_visible_only_inside_the_frame_and_confident():
    low = person(left_ankle=(276, 700, 0.2))
    outside = person(left_ankle=(W + 3, 700, 0.99))

    assert not decide([low]).passed
    assert decide([low], min_confidence=0.1).passed
    assert decide([outside]).reason.endswith("left ankle")


def test_no_person():
    assert decide([]).reason == "no person found"
    invisible = [[0.0, 0.0, 0.0] for _ in COCO18]
    assert decide([invisible]).reason == "no person found"


def test_joint_groups_and_names():
    assert expand_joints(["ankles", "neck"]) == ("neck", "right_ankle", "left_ankle")
    with pytest.raises(ValueError, match="did you mean 'ankles'"):
        expand_joints(["ankels"])


def test_a_mistyped_joint_in_the_config_is_reported():
    with pytest.raises(ConfigError, match="required_joints.*unknown joint 'hipps'"):
        validate_options(PoseFilter, "filters.pose", {"required_joints": ["hipps"]})


# --- the annotator reuses the filter's keypoints -------------------------------------


class NoModel:
    def find_people(self, image, limit):
        raise AssertionError("the annotator ran the model again")

    def close(self):
        pass


def test_the_annotator_reuses_the_filters_keypoints():
    annotator = PoseKeypoints(PoseKeypoints.Options(), Context(domain=None))
    annotator.model = NoModel()
    keypoints = person()
    verdict = Verdict(passed=True, artefacts={"keypoints": keypoints})

    [note] = annotator.annotate([candidate(Image.new("RGB", (W, H)))], [[verdict]])

    assert note.keypoints == keypoints
    skeleton = note.masks["skeleton"]
    assert skeleton.size == (W, H)
    assert skeleton.getbbox() is not None  # something was drawn
    assert annotator.usage() == {}


def test_the_skeleton_leaves_out_joints_outside_the_frame():
    inside = render_skeleton(person(), (W, H))
    cropped = render_skeleton(person(top=400), (W, H))

    assert inside.getbbox()[3] > 700
    assert cropped.getbbox()[3] <= H


# --- BlazePose on the shared photos --------------------------------------------------


@pytest.fixture(scope="module")
def pose_filter():
    pytest.importorskip("mediapipe")
    options = validate_options(PoseFilter, "filters.pose", {"required_joints": FASHION})
    component = PoseFilter(options, Context(domain=None))
    yield component
    component.close()


def photo(fashion_refs, number):
    from chatroom.references import load_image

    [path] = fashion_refs.glob(f"fashion_{number:02d}.*")
    return load_image(path)


def side_by_side(left, right):
    right = right.resize((round(right.width * left.height / right.height), left.height))
    canvas = Image.new("RGB", (left.width + right.width, left.height), "white")
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def test_real_photos_fixtures_get_the_right_verdicts(pose_filter, fashion_refs):
    full = photo(fashion_refs, 1)
    knees = max(full.getbbox()[3] * 0.62, 1)  # fashion_01's knees are at ~0.66
    fixtures = {
        "full": full,
        "two people": side_by_side(full, photo(fashion_refs, 11)),
        "above the knees": full.crop((0, 0, full.width, int(knees))),
        "200 pixels": ImageOps.contain(full, (200, 200)),
        "grayscale": photo(fashion_refs, 3).convert("L"),
        "half body": photo(fashion_refs, 7),
    }
    verdicts = dict(
        zip(
            fixtures,
            pose_filter.check([candidate(i) for i in fixtures.values()]),
            strict=True,
        )
    )

    assert verdicts["full"].passed, verdicts["full"]
    assert verdicts["200 pixels"].passed, verdicts["200 pixels"]
    assert verdicts["grayscale"].passed, verdicts["grayscale"]
    assert verdicts["two people"].reason == "more than one person"
    assert verdicts["two people"].scores["people"] == 2
    for name in ("above the knees", "half body"):
        assert "ankle" in verdicts[name].reason, (name, verdicts[name])
    keypoints = verdicts["full"].artefacts["keypoints"]
    assert len(keypoints) == 18 and all(len(j) == 3 for j in keypoints)


def test_passers_by_in_a_street_photo_are_not_counted(pose_filter, fashion_refs):
    [verdict] = pose_filter.check([candidate(photo(fashion_refs, 13))])

    assert verdict.passed, verdict
    assert verdict.scores["detected"] >= 2 and verdict.scores["people"] == 1
    assert len(verdict.artefacts["people"]) == verdict.scores["detected"]


def test_grey_copies_pass_with_a_second_look_at_an_equalised_copy(
    pose_filter, fashion_refs
):
    # Without the second look, BlazePose found nobody in the grey copies of 02, 05,
    # 06 and 12 (and of 01 and 13, which the test below keeps as a known miss).
    numbers = [n for n in range(1, 18) if n not in (1, 7, 13)]
    greys = [candidate(photo(fashion_refs, n).convert("L")) for n in numbers]
    verdicts = pose_filter.check(greys)

    failed = {
        n: v.reason for n, v in zip(numbers, verdicts, strict=True) if not v.passed
    }
    assert failed == {}


@pytest.mark.xfail(
    strict=True,
    reason="BlazePose finds nobody in the grey copies of fashion_01 and fashion_13, "
    "even equalised: they are rejected as 'no person'",
)
def test_a_grey_copy_of_every_photo_passes(pose_filter, fashion_refs):
    [verdict] = pose_filter.check([candidate(photo(fashion_refs, 1).convert("L"))])

    assert verdict.passed, verdict
