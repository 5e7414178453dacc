"""The mask check: holes and fragments in binary masks, on synthetic masks."""

from __future__ import annotations

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("scipy")

from chatroom.components import Annotator, Context, validate_options  # noqa: E402
from chatroom.errors import PluginError  # noqa: E402
from chatroom.models import (  # noqa: E402
    Annotation,
    Candidate,
    GenerationSettings,
    PromptSpec,  # noqa: E402
)
from chatroom.plugins.mask_check import MaskCheck, mask_problems  # noqa: E402


def body(h=120, w=80):
    """A filled ellipse, the rough shape of a person mask."""
    yy, xx = np.mgrid[:h, :w]
    return (((yy - h / 2) / (h * 0.4)) ** 2 + ((xx - w / 2) / (w * 0.3)) ** 2) <= 1


def with_hole(size=8):
    mask = body()
    mask[56 : 56 + size, 36 : 36 + size] = False
    return mask


def with_fragment(size=8):
    mask = body()
    mask[2 : 2 + size, 2 : 2 + size] = True
    return mask


def as_image(mask):
    from PIL import Image

    return Image.fromarray(mask.astype(np.uint8) * 255)


def test_clean_mask_passes():
    reasons, measures = mask_problems(as_image(body()))
    assert reasons == []
    assert measures["pieces"] == 1 and measures["largest_hole"] == 0


def test_hole_is_found_and_sized():
    reasons, measures = mask_problems(as_image(with_hole()))
    assert len(reasons) == 1 and reasons[0].startswith("1 hole(s)")
    area = with_hole().sum()
    assert measures["largest_hole"] == pytest.approx(64 / area, abs=1e-4)


def test_fragment_is_found():
    reasons, measures = mask_problems(with_fragment())
    assert len(reasons) == 1 and reasons[0].startswith("1 fragment(s)")
    assert measures["pieces"] == 2


def test_small_specks_are_under_the_minimum():
    assert mask_problems(with_hole(size=2))[0] == []
    assert mask_problems(with_fragment(size=2))[0] == []


def test_background_open_to_the_border_is_not_a_hole():
    mask = body()
    mask[:, 38:42] = False  # a gap between the legs, open at top and bottom
    reasons, _ = mask_problems(mask)
    assert not any("hole" in r for r in reasons)


def painted(mask, hole_colour):
    """A red figure on white, the mask's hole painted ``hole_colour``."""
    from PIL import Image

    pixels = np.full(mask.shape + (3,), 255, np.uint8)
    pixels[body()] = (200, 30, 40)
    pixels[body() & ~mask] = hole_colour
    return Image.fromarray(pixels)


def test_background_seen_through_the_body_is_a_gap_not_a_hole():
    mask = with_hole(size=12)
    # a hand on the hip: the wall shows through, white like the backdrop
    reasons, measures = mask_problems(mask, image=painted(mask, (255, 255, 255)))
    assert reasons == [] and measures["gaps"] == 1
    # the segmenter missed part of the red dress: a hole
    reasons, measures = mask_problems(mask, image=painted(mask, (190, 40, 40)))
    assert reasons[0].startswith("1 hole(s)") and measures["gaps"] == 0


def test_empty_mask():
    assert mask_problems(np.zeros((10, 10), bool))[0] == ["empty"]


class Scripted(Annotator):
    """Returns the masks it was given, one annotation per candidate."""

    name = "scripted_masks"

    def __init__(self, masks):
        self.masks = masks

    def annotate(self, candidates, verdicts):
        return [
            Annotation(masks={part: as_image(m) for part, m in masks.items()})
            for masks in self.masks
        ]

    def close(self):
        pass


def candidates(count):
    spec = PromptSpec(index=0, item_id="x", prompt="", negative_prompt="")
    return [
        Candidate(index=n, item_id=f"i{n}", spec=spec, settings=GenerationSettings())
        for n in range(count)
    ]


def checker(masks, **raw):
    pytest.importorskip("mediapipe")
    options = validate_options(MaskCheck, "annotators.mask_check", raw)
    check = MaskCheck(options, Context(domain=None))
    check.inner = Scripted(masks)
    return check


def test_failing_masks_are_dropped_with_the_reason():
    notes = checker(
        [
            {"person": body()},
            {"person": with_hole(), "upper": body()},
            {"person": with_fragment()},
        ]
    ).annotate(candidates(3), [[], [], []])
    clean, holed, fragmented = notes
    assert set(clean.masks) == {"person"} and "mask_check" not in clean.qa
    assert set(holed.masks) == {"upper"} and not holed.rejected
    assert holed.qa["mask_check"]["person"].startswith("1 hole(s)")
    assert fragmented.masks == {}
    assert fragmented.rejected.startswith("mask check: person: 1 fragment(s)")


def test_keeping_an_item_without_masks():
    [note] = checker([{"person": with_hole()}], reject_when_empty=False).annotate(
        candidates(1), [[]]
    )
    assert note.masks == {} and note.rejected is None
    assert "hole" in note.qa["mask_check"]["person"]


@pytest.mark.parametrize(
    "name, gaps",
    [
        ("fashion_05", 0),  # one solid piece
        ("fashion_02", 1),  # a hand on the hip: wall between arm and body
        ("fashion_17", 1),  # feet together: the street between the legs
    ],
)
def test_real_person_masks_of_shared_photos_are_kept(fashion_refs, name, gaps):
    pytest.importorskip("mediapipe")
    from PIL import Image

    options = validate_options(MaskCheck, "annotators.mask_check", {})
    check = MaskCheck(options, Context(domain=None))
    with Image.open(fashion_refs / f"{name}.jpg") as img:
        image = img.convert("RGB")
    [candidate] = candidates(1)
    candidate.image = image
    [note] = check.annotate([candidate], [[]])
    check.close()
    assert "person" in note.masks and "mask_check" not in note.qa, note.qa
    assert note.qa["person_share"] > 0.05
    _, measures = mask_problems(note.masks["person"], image=image)
    assert measures["gaps"] == gaps


def test_unknown_annotator_is_named():
    options = validate_options(MaskCheck, "annotators.mask_check", {"annotator": "x"})
    with pytest.raises(PluginError, match="unknown annotator 'x'"):
        MaskCheck(options, Context(domain=None))


class ScriptedBlip2:
    """Answers each question from a script; records the questions."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.questions = []

    def ask(self, images, question):
        from chatroom.plugins.blip2 import Answer

        self.questions.append(question)
        text = self.answers.pop(0)
        return [Answer(text=text, raw=text, problem=None if text else "empty")]

    def close(self):
        pass


def with_vlm(masks, answers):
    check = checker(masks, vlm_model="unused")  # the model loads on first use only
    check.questions = ScriptedBlip2(answers)
    return check


def test_blip2_saying_no_drops_the_mask():
    from PIL import Image

    [candidate] = candidates(1)
    candidate.image = Image.new("RGB", (80, 120), "white")
    check = with_vlm([{"person": body(), "upper_clothes": body()}], ["yes", "no"])
    [note] = check.annotate([candidate], [[]])
    assert set(note.masks) == {"person"}
    assert note.qa["mask_check"] == {"upper_clothes": "BLIP-2 answered 'no'"}
    assert note.qa["mask_vlm"] == {"person": "yes", "upper_clothes": "no"}
    assert check.questions.questions == [
        "Does the picture show a person?",
        "Does the picture show upper clothes?",
    ]


def test_an_unusable_answer_keeps_the_mask():
    from PIL import Image

    [candidate] = candidates(1)
    candidate.image = Image.new("RGB", (80, 120), "white")
    [note] = with_vlm([{"person": body()}], [None]).annotate([candidate], [[]])
    assert set(note.masks) == {"person"} and "mask_check" not in note.qa
    assert note.qa["mask_vlm"]["person"].startswith("(no usable answer")


def test_the_tiny_blip2_is_asked(smoke_dir):
    pytest.importorskip("transformers")
    from PIL import Image

    [candidate] = candidates(1)
    candidate.image = Image.new("RGB", (80, 120), (30, 60, 90))
    check = checker(
        [{"person": body()}], vlm_model=str(smoke_dir / "blip2"), vlm_device="cpu"
    )
    [note] = check.annotate([candidate], [[]])
    check.close()
    # random weights answer garbage; the answer is recorded either way
    assert isinstance(note.qa["mask_vlm"]["person"], str)
    assert check.describe()["vlm"] == str(smoke_dir / "blip2")
