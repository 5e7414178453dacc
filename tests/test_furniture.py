"""Furniture: one main object on a plain background, and its mask, on the real photos."""

import numpy as np
import pytest
from conftest import candidate, reference_photos
from PIL import Image, ImageDraw

from chatroom.components import Context, validate_options
from chatroom.errors import ConfigError
from chatroom.plugins.object_checks import ObjectMask, SingleObjectFilter

# furniture_01-06: catalogue shots, one piece on white. 07 is a showroom photo with
# other chairs around; 08 a chair at a desk in a room: both genuinely cluttered.
PRODUCT_SHOTS = [f"furniture_0{i}.jpg" for i in range(1, 7)]
CLUTTERED = ["furniture_07.jpg", "furniture_08.png"]


@pytest.fixture(scope="module")
def photos():
    return reference_photos("furniture", PRODUCT_SHOTS + CLUTTERED)


def judge(image, **options):
    component = SingleObjectFilter(
        SingleObjectFilter.Options(**options), Context(domain=None)
    )
    [verdict] = component.check([candidate(image)])
    return verdict


def side_by_side(left, right):
    canvas = Image.new(
        "RGB", (left.width + right.width, max(left.height, right.height))
    )
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


@pytest.mark.parametrize("name", PRODUCT_SHOTS)
def test_a_product_shot_passes(photos, name):
    verdict = judge(photos[name])
    assert verdict.passed, (verdict.reason, verdict.scores)
    assert verdict.scores["border_uniformity"] >= 0.9
    assert verdict.scores["dominance"] >= 0.85


@pytest.mark.parametrize("name", CLUTTERED)
def test_a_cluttered_photo_fails(photos, name):
    verdict = judge(photos[name])
    assert not verdict.passed
    assert verdict.reason == "background is not plain"
    assert verdict.scores["border_uniformity"] < 0.9


def test_a_cluttered_crop_fails(photos):
    showroom = photos["furniture_07.jpg"]
    crop = showroom.crop((0, 0, showroom.width // 2, showroom.height // 2))
    assert not judge(crop).passed


@pytest.mark.parametrize(
    "pair",
    [
        ("furniture_01.jpg", "furniture_03.jpg"),
        ("furniture_04.jpg", "furniture_06.jpg"),
    ],
)
def test_a_collage_of_two_pieces_fails(photos, pair):
    collage = side_by_side(photos[pair[0]], photos[pair[1]])
    verdict = judge(collage)
    assert not verdict.passed
    assert verdict.reason == "more than one object"
    assert verdict.scores["border_uniformity"] >= 0.9  # the background alone is fine


def test_thresholds_are_options(photos):
    collage = side_by_side(photos["furniture_01.jpg"], photos["furniture_03.jpg"])
    assert judge(collage, max_second_ratio=1.0, min_dominance=0.0).passed
    assert not judge(photos["furniture_01.jpg"], min_object_share=0.5).passed


def test_a_blank_image_has_no_object():
    verdict = judge(Image.new("RGB", (200, 200), "white"))
    assert not verdict.passed and verdict.reason == "no main object"


def test_a_piece_cut_off_by_the_frame_fails():
    image = Image.new("RGB", (300, 200), "white")
    ImageDraw.Draw(image).rectangle([-20, 40, 320, 160], fill=(90, 60, 30))
    verdict = judge(image)
    assert not verdict.passed
    assert verdict.scores["cut_sides"] >= 2


def test_a_bad_option_names_the_plugin_and_value():
    with pytest.raises(ConfigError, match=r"single_object.*min_dominance.*1\.5"):
        validate_options(SingleObjectFilter, "filters", {"min_dominance": 1.5})


# --- the mask ----------------------------------------------------------------------


def test_the_mask_covers_the_object_at_the_original_size(photos):
    annotator = ObjectMask(ObjectMask.Options(), Context(domain=None))
    showroom = photos["furniture_07.jpg"]  # 3024x4032: measured small, scaled back
    images = [photos["furniture_04.jpg"], showroom]
    notes = annotator.annotate([candidate(i) for i in images], [[], []])

    for image, note in zip(images, notes, strict=True):
        mask = note.masks["object"]
        assert mask.size == image.size and mask.mode == "L"
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        assert note.qa["object_share"] == pytest.approx((values > 0).mean(), abs=1e-3)

    # the sofa is dark on white: the mask is dark pixels, the rest is white
    sofa = np.asarray(photos["furniture_04.jpg"].convert("L"))
    on = np.asarray(notes[0].masks["object"]) > 0
    assert sofa[on].mean() < 120 < sofa[~on].mean()
    assert 0.15 < on.mean() < 0.6


def test_an_empty_image_gets_no_mask():
    annotator = ObjectMask(ObjectMask.Options(), Context(domain=None))
    [note] = annotator.annotate([candidate(Image.new("RGB", (64, 64), "white"))], [[]])
    assert note.rejected == "object mask is empty" and not note.masks
