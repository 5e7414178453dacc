"""Architecture: no people in frame, and edge and depth maps for ControlNet users."""

import numpy as np
import pytest
from conftest import candidate, reference_photos

from chatroom.components import Context, validate_options
from chatroom.errors import ConfigError
from chatroom.plugins.control_maps import DepthMap, EdgeMap, write_tiny_depth_model
from chatroom.plugins.scene_checks import (
    NoPeopleFilter,
    NoPeopleOptions,
    decide_no_people,
)

# Exteriors without anyone large in frame. (architecture_04 shows a crowd of small
# figures in front of the Doge's Palace; BlazePose does not find them: see the docs.)
EMPTY = ["architecture_01.jpg", "architecture_03.jpg", "architecture_05.jpg"]


@pytest.fixture(scope="module")
def photos():
    return {
        **reference_photos("architecture", EMPTY),
        **reference_photos("fashion", ["fashion_01.jpg"]),
    }


def pasted(building, person, share=0.6):
    """The person photo, scaled to ``share`` of the frame height, pasted in."""
    out = building.copy()
    figure = person.copy()
    figure.thumbnail((building.width, int(building.height * share)))
    out.paste(figure, (building.width // 3, building.height - figure.height - 10))
    return out


@pytest.fixture(scope="module")
def no_people():
    component = NoPeopleFilter(NoPeopleFilter.Options(), Context(domain=None))
    yield component
    component.close()


def test_buildings_pass_and_a_pasted_person_fails(photos, no_people):
    buildings = [photos[name] for name in EMPTY]
    with_person = [pasted(b, photos["fashion_01.jpg"]) for b in buildings[::2]]
    verdicts = no_people.check([candidate(i) for i in buildings + with_person])

    for name, verdict in zip(EMPTY, verdicts, strict=False):
        assert verdict.passed, (name, verdict.scores)
        assert verdict.scores["people"] == 0
    for verdict in verdicts[len(buildings) :]:
        assert not verdict.passed and verdict.reason == "person in frame"
        assert verdict.scores["people"] == 1
        assert verdict.scores["tallest"] > 0.3


def test_small_people_can_be_ignored():
    person = [[100.0, y, 0.9] for y in np.linspace(300, 340, 18)]  # 40 px of 400
    tall = [[200.0, y, 0.9] for y in np.linspace(50, 350, 18)]
    strict = NoPeopleOptions()
    lenient = NoPeopleOptions(min_height=0.2)

    assert decide_no_people([person], 400, 400, strict)[0] == "person in frame"
    reason, scores = decide_no_people([person], 400, 400, lenient)
    assert reason == "" and scores == {"detected": 1.0, "people": 0.0, "tallest": 0.1}
    assert decide_no_people([person, tall], 400, 400, lenient)[0] == "person in frame"
    assert decide_no_people([person, tall], 400, 400, strict)[0] == "people in frame"


# --- edge map ------------------------------------------------------------------------


def test_the_edge_map_has_the_original_size_and_configurable_thresholds(photos):
    image = photos["architecture_03.jpg"]
    maps = {}
    for low, high in ((50, 100), (150, 250)):
        annotator = EdgeMap(
            EdgeMap.Options(low_threshold=low, high_threshold=high),
            Context(domain=None),
        )
        [note] = annotator.annotate([candidate(image)], [[]])
        edges = note.masks["edges"]
        assert edges.size == image.size and edges.mode == "L"
        values = np.asarray(edges)
        assert set(np.unique(values)) == {0, 255}
        maps[low] = values
        assert note.qa["edge_density"] == pytest.approx((values > 0).mean(), abs=1e-3)
    # stricter thresholds keep fewer edges, a subset of the looser ones' strong edges
    assert (maps[150] > 0).sum() < (maps[50] > 0).sum()


@pytest.mark.parametrize(
    "options, word",
    [
        ({"low_threshold": 200, "high_threshold": 100}, "low_threshold"),
        ({"blur": 4}, "odd"),
    ],
)
def test_bad_edge_options_are_one_line_errors(options, word):
    with pytest.raises(ConfigError, match=word):
        validate_options(EdgeMap, "annotators.edge_map", options)


# --- depth map -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_depth(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    return write_tiny_depth_model(tmp_path_factory.mktemp("depth"))


def test_depth_maps_have_the_original_size(photos, tiny_depth):
    annotator = DepthMap(
        DepthMap.Options(model=str(tiny_depth), device="cpu", batch_size=2),
        Context(domain=None),
    )
    # two shapes: batched by shape, each map back at its own size
    images = [
        photos["architecture_01.jpg"],
        photos["architecture_05.jpg"],
        photos["architecture_01.jpg"].resize((300, 200)),
        None,
    ]
    notes = annotator.annotate([candidate(i) for i in images], [[]] * len(images))

    for image, note in zip(images[:3], notes, strict=False):
        depth = note.masks["depth"]
        assert depth.size == image.size and depth.mode == "L"
        values = np.asarray(depth)
        assert values.min() == 0 and values.max() == 255  # scaled per image
    assert notes[3].rejected == "no image"
    assert annotator.describe()["architecture"] == "DepthAnythingForDepthEstimation"
    assert annotator.usage() == {"images": 3.0}
    annotator.close()


def test_the_smoke_models_carry_the_depth_model(smoke_dir):
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    folder = smoke_dir / "depth"
    model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    assert type(model).__name__ == "DepthAnythingForDepthEstimation"
    assert processor.ensure_multiple_of == 14
    assert f'model = "{folder.as_posix()}"' in (smoke_dir / "smoke.toml").read_text()


def test_a_missing_depth_model_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="does not exist"):
        DepthMap(DepthMap.Options(model=str(tmp_path / "nope")), Context(domain=None))
    with pytest.raises(ConfigError, match="not in the local cache"):
        DepthMap(DepthMap.Options(model="someone/depth-model"), Context(domain=None))
