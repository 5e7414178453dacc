"""The NudeNet filter: labels checked at start, scores on every verdict."""

import pytest
from PIL import Image

from chatroom.components import Context, validate_options
from chatroom.errors import ConfigError
from chatroom.models import Candidate, GenerationSettings, PromptSpec

pytest.importorskip("nudenet")

from chatroom.plugins import nudenet_filter  # noqa: E402
from chatroom.plugins.nudenet_filter import NudeNetFilter  # noqa: E402


def candidate(image):
    spec = PromptSpec(index=0, item_id="i0", prompt="", negative_prompt="")
    return Candidate(
        index=0, item_id="i0", spec=spec, settings=GenerationSettings(), image=image
    )


def build(**options):
    return NudeNetFilter(
        validate_options(NudeNetFilter, "filters.nudenet", options),
        Context(domain=None),
    )


class FakeDetector:
    """Returns the detections it was given and records the arrays it saw."""

    def __init__(self, detections):
        self.detections = detections
        self.seen = []

    def detect(self, pixels):
        self.seen.append(pixels.shape)
        return self.detections


def inject(monkeypatch, detections) -> FakeDetector:
    """Build the filter around a fake detector that knows the library's labels."""
    fake = FakeDetector(detections)
    monkeypatch.setattr(NudeNetFilter, "_load", lambda self: fake)
    monkeypatch.setattr(nudenet_filter, "model_labels", lambda _: library_labels())
    return fake


def test_an_injected_exposed_detection_is_rejected_with_its_scores(monkeypatch):
    detections = [
        {"class": "FACE_FEMALE", "score": 0.9, "box": [1, 1, 5, 5]},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.31, "box": [1, 1, 5, 5]},
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.83, "box": [9, 9, 5, 5]},
    ]
    fake = inject(monkeypatch, detections)

    [verdict] = build().check([candidate(Image.new("RGB", (40, 60)))])

    assert not verdict.passed
    assert verdict.reason == "nsfw: female breast exposed"
    assert verdict.scores["female_breast_exposed"] == 0.83
    assert verdict.scores["buttocks_exposed"] == 0.0
    assert "face_female" not in verdict.scores
    assert fake.seen == [(60, 40, 3)]


def test_a_score_below_the_threshold_passes_and_is_recorded(monkeypatch):
    inject(monkeypatch, [{"class": "BUTTOCKS_EXPOSED", "score": 0.7, "box": [0] * 4}])

    [verdict] = build(thresholds={"BUTTOCKS_EXPOSED": 0.8}).check(
        [candidate(Image.new("L", (40, 60)))]
    )

    assert verdict.passed and verdict.scores == {"buttocks_exposed": 0.7}


def test_a_label_the_model_does_not_know_fails_at_start():
    with pytest.raises(ConfigError, match="'FEMALE_BREAST_NAKED'.*did you mean"):
        build(thresholds={"FEMALE_BREAST_NAKED": 0.5})


def test_model_and_library_labels_must_agree(monkeypatch):
    monkeypatch.setattr(
        nudenet_filter, "model_labels", lambda _: list(reversed(library_labels()))
    )

    with pytest.raises(ConfigError, match="labels and the library's differ"):
        build()


def test_a_threshold_out_of_range_is_refused():
    with pytest.raises(ConfigError, match="thresholds.ANUS_EXPOSED = 1.5"):
        build(thresholds={"ANUS_EXPOSED": 1.5})


def library_labels():
    return nudenet_filter.library_labels()


def test_none_of_the_shared_fashion_photos_is_flagged(fashion_refs):
    from chatroom.references import load_image

    component = build()
    photos = sorted(p for p in fashion_refs.iterdir() if p.stem.startswith("fashion"))
    verdicts = component.check([candidate(load_image(p)) for p in photos])

    assert len(verdicts) == 17
    flagged = {
        p.name: v.reason for p, v in zip(photos, verdicts, strict=True) if not v.passed
    }
    assert flagged == {}
    assert all(
        set(v.scores) == {k.lower() for k in nudenet_filter.DEFAULT_THRESHOLDS}
        for v in verdicts
    )
    assert component.usage() == {"images": 17.0}
