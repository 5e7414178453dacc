"""OpenPose through controlnet_aux: its arrays -> COCO-18, the smoke checkpoint, the
components."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import candidate
from PIL import Image

from chatroom.components import Context, validate_options
from chatroom.errors import ConfigError
from chatroom.models import Verdict
from chatroom.plugins.openpose import (
    BODY_FILE,
    OpenPoseBody,
    OpenPoseFilter,
    OpenPoseKeypoints,
    body_model_shapes,
    people_from_arrays,
)
from chatroom.plugins.pose import COCO18, decide_pose

FASHION = ["shoulders", "hips", "ankles"]


def arrays(people):
    """OpenPose-style candidate and subset arrays for people given as
    {joint index: (x, y, score)}; the subset's total score is the people's order."""
    candidate, subset = [], []
    for rank, joints in enumerate(people):
        row = -np.ones(20)
        for joint, (x, y, score) in joints.items():
            row[joint] = len(candidate)
            candidate.append([x, y, score, len(candidate)])
        row[18] = 10.0 - rank
        row[19] = len(joints)
        subset.append(row)
    return np.array(candidate, dtype=float).reshape(-1, 4), np.array(subset)


def standing(x, top, height, score=0.8, skip=()):
    """A standing person's joints (COCO-18 index -> (x, y, score))."""
    rows = [0.0, 0.14, 0.15, 0.33, 0.48, 0.15, 0.33, 0.48, 0.5, 0.74, 1.0, 0.5, 0.74]
    rows += [1.0, -0.01, -0.01, 0.0, 0.0]
    sides = [0, 0, -1, -1, -1, 1, 1, 1, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5]
    sides += [-0.2, 0.2, -0.4, 0.4]
    half = height * 0.07
    return {
        i: (x + sides[i] * half, top + rows[i] * height, score)
        for i in range(18)
        if i not in skip
    }


def body_options(component, checkpoint, **extra):
    return validate_options(
        component,
        component.name,
        {"checkpoint": str(checkpoint), "device": "cpu", **extra},
    )


# --- OpenPose's arrays -> COCO-18 ------------------------------------------------


def test_arrays_become_coco18_keypoints_best_person_first():
    main = standing(x=200, top=40, height=600, score=0.9, skip=(16,))
    passer_by = standing(x=420, top=300, height=120, score=0.5)
    # the passer-by comes first in the subset but has the lower total score
    candidate_rows, subset = arrays([main, passer_by])
    subset = subset[::-1].copy()
    people = people_from_arrays(candidate_rows, subset)

    assert len(people) == 2
    assert all(len(p) == len(COCO18) and all(len(j) == 3 for j in p) for p in people)
    first = people[0]
    assert first[COCO18.index("nose")] == [200.0, 40.0, 0.9]
    assert first[COCO18.index("left_ankle")][1] == pytest.approx(640.0)
    # a joint OpenPose did not find is never visible
    assert first[COCO18.index("right_ear")] == [0.0, 0.0, 0.0]
    assert people[1][COCO18.index("nose")][:2] == [420.0, 300.0]

    # the small person behind does not count: one full-body person passes
    decision = decide_pose(people, 512, 768, FASHION, min_confidence=0.1)
    assert decision.passed and decision.main == 0
    assert decision.scores["detected"] == 2 and decision.scores["people"] == 1


def test_two_prominent_people_are_rejected():
    people = people_from_arrays(
        *arrays([standing(150, 40, 600), standing(380, 60, 560)])
    )
    decision = decide_pose(people, 512, 768, FASHION, min_confidence=0.1)
    assert not decision.passed and decision.reason == "more than one person"


def test_coordinates_are_scaled_back_to_the_original_image():
    candidate_rows, subset = arrays([standing(100, 10, 200)])
    people = people_from_arrays(candidate_rows, subset, scale_x=2.5, scale_y=2.0)
    nose = people[0][COCO18.index("nose")]
    assert nose[:2] == [250.0, 20.0]


def test_no_people_no_keypoints():
    assert people_from_arrays(np.zeros((0, 4)), -np.ones((0, 20))) == []


# --- the smoke checkpoint and controlnet_aux's loader ---------------------------


@pytest.fixture(scope="module")
def body_checkpoint(smoke_dir):
    return smoke_dir / "openpose" / BODY_FILE


def test_smoke_checkpoint_has_the_published_keys(body_checkpoint):
    import torch
    from controlnet_aux.open_pose.model import bodypose_model

    state = torch.load(str(body_checkpoint), weights_only=True)
    # controlnet_aux's loader drops the first part of each module name (model0.,
    # model1_1., ...) to find a tensor in body_pose_model.pth
    expected = {
        key.split(".", 1)[1]: tuple(value.shape)
        for key, value in bodypose_model().state_dict().items()
    }
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert body_model_shapes() == expected
    assert len(state) == 184
    assert "Mconv7_stage6_L2.weight" in state and "conv4_4_CPM.bias" in state


def test_body_loads_through_controlnet_aux_and_finds_nobody(body_checkpoint):
    from controlnet_aux.open_pose.body import Body

    body = Body(str(body_checkpoint))  # strict load_state_dict inside
    candidate_rows, subset = body(np.full((96, 64, 3), 128, dtype=np.uint8))
    assert subset.shape == (0, 20)  # random weights find nobody

    component = OpenPoseFilter(
        body_options(OpenPoseFilter, body_checkpoint.parent), Context(domain=None)
    )
    (verdict,) = component.check([candidate(Image.new("RGB", (96, 144), "grey"))])
    assert not verdict.passed and verdict.reason == "no person found"
    assert verdict.artefacts["people"] == []
    assert component.describe()["checkpoint"] == str(body_checkpoint)
    component.close()


class FakeBody:
    """Stands in for controlnet_aux's Body: one person spanning the whole picture
    it is given, in that picture's pixels."""

    def __init__(self):
        self.seen = []

    def __call__(self, bgr):
        height, width = bgr.shape[:2]
        self.seen.append((width, height))
        joints = standing(x=width / 2, top=0, height=height - 1, skip=(14, 15))
        joints[COCO18.index("right_wrist")] = (width - 1, height / 2, 0.7)
        joints[COCO18.index("left_wrist")] = (0, height / 2, 0.7)
        return arrays([joints])


@pytest.mark.parametrize("size", [(1200, 700), (300, 900), (64, 96)])
def test_keypoints_are_in_the_original_images_pixels(size):
    width, height = size
    options = OpenPoseFilter.Options(checkpoint="unused", detect_resolution=512)
    model = OpenPoseBody("filters (openpose)", options)
    model._body = FakeBody()
    (person,) = model.find_people(Image.new("RGB", size), limit=4)

    seen = model._body.seen[0]
    assert min(seen) == min(512, width, height)  # large pictures are scaled down
    xs = [j[0] for j in person if j[2] > 0]
    ys = [j[1] for j in person if j[2] > 0]
    assert 0 <= min(xs) and max(xs) < width and max(xs) > 0.98 * width
    assert 0 <= min(ys) and max(ys) < height and max(ys) > 0.98 * height


def test_filter_passes_a_full_body_person_and_keeps_the_skeleton():
    component = OpenPoseFilter(
        OpenPoseFilter.Options(checkpoint="unused", required_joints=FASHION),
        Context(domain=None),
    )
    component.model._body = FakeBody()
    (verdict,) = component.check([candidate(Image.new("RGB", (512, 768)))])
    assert verdict.passed, verdict.reason
    assert len(verdict.artefacts["keypoints"]) == 18
    assert verdict.artefacts["image_size"] == [512, 768]


def test_the_annotator_reuses_the_filters_keypoints():
    # no checkpoint: loading the model would fail, so it must not load
    annotator = OpenPoseKeypoints(OpenPoseKeypoints.Options(), Context(domain=None))
    keypoints = people_from_arrays(*arrays([standing(256, 40, 640)]))[0]
    verdict = Verdict(passed=True, artefacts={"keypoints": keypoints})
    (note,) = annotator.annotate([candidate(Image.new("RGB", (512, 768)))], [[verdict]])
    assert note.keypoints == keypoints and note.rejected is None
    assert note.masks["skeleton"].size == (512, 768)
    assert annotator.usage() == {}


def test_the_annotator_runs_the_model_without_a_filter(body_checkpoint):
    annotator = OpenPoseKeypoints(
        body_options(OpenPoseKeypoints, body_checkpoint), Context(domain=None)
    )
    (note,) = annotator.annotate([candidate(Image.new("RGB", (64, 96)))], [[]])
    assert note.rejected == "no person for keypoints"
    assert annotator.usage() == {"detected": 1.0}


# --- errors ---------------------------------------------------------------------


def test_a_missing_checkpoint_says_which_file_to_provide(tmp_path):
    for value in ("", str(tmp_path)):
        component = OpenPoseFilter(
            OpenPoseFilter.Options(checkpoint=value), Context(domain=None)
        )
        with pytest.raises(ConfigError) as caught:
            component.check([candidate(Image.new("RGB", (64, 96)))])
        message = str(caught.value)
        assert "\n" not in message
        assert "filters (openpose)" in message and BODY_FILE in message


def test_a_checkpoint_of_another_model_is_named(tmp_path):
    import torch

    path = tmp_path / BODY_FILE
    torch.save({"conv1_1.weight": torch.zeros(64, 3, 3, 3)}, str(path))
    model = OpenPoseBody(
        "filters (openpose)", OpenPoseFilter.Options(checkpoint=str(path))
    )
    with pytest.raises(ConfigError, match="not OpenPose's body model: it has no"):
        model.load()


def test_a_text_file_as_checkpoint_is_named_unreadable(tmp_path):
    path = tmp_path / BODY_FILE
    path.write_text("not a checkpoint\n")
    model = OpenPoseBody(
        "filters (openpose)", OpenPoseFilter.Options(checkpoint=str(path))
    )
    with pytest.raises(ConfigError) as err:
        model.load()
    message = str(err.value)
    assert "\n" not in message and "it has no" not in message
    assert message.startswith("filters (openpose): option 'checkpoint'")
    assert str(path) in message and "not a torch checkpoint" in message


def test_options_check_joint_names():
    with pytest.raises(ConfigError, match="hipps"):
        validate_options(
            OpenPoseFilter, "filters.openpose", {"required_joints": ["hipps"]}
        )
    with pytest.raises(ConfigError, match="unknown option 'checkpiont'"):
        validate_options(OpenPoseFilter, "filters.openpose", {"checkpiont": "x"})
