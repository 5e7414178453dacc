"""The quality filter: BRISQUE on real photos, NIMA through the offline loader."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("brisque")

from conftest import candidates, reference_photos  # noqa: E402

from chatroom.components import Context, validate_options  # noqa: E402
from chatroom.errors import ConfigError  # noqa: E402
from chatroom.plugins.quality import QualityFilter, score_images  # noqa: E402

# Street photos with detail everywhere: BRISQUE rates them well (flat studio
# backgrounds read as poor quality to it).
STREET = ("fashion_10", "fashion_13", "fashion_16")


def photos(names):
    return list(reference_photos("fashion", [f"{name}.jpg" for name in names]).values())


def ruined(image):
    """A heavily blurred copy."""
    from PIL import ImageFilter

    return image.filter(ImageFilter.GaussianBlur(8))


def build(**raw):
    options = validate_options(QualityFilter, "filters.quality", raw)
    return QualityFilter(options, Context(domain=None))


def test_brisque_tells_photos_from_blurred_copies():
    originals = photos(STREET)
    good = score_images(originals, "brisque")
    bad = score_images([ruined(i) for i in originals], "brisque")
    assert all(g < 40 for g in good), good
    assert all(b > 80 for b in bad), bad


def test_filter_rejects_the_blurred_copy_and_scores_both():
    [original] = photos(STREET[:1])
    verdicts = build(metric="brisque").check(candidates([original, ruined(original)]))
    kept, rejected = verdicts
    assert kept.passed and kept.scores["brisque"] < 40
    assert not rejected.passed and rejected.scores["brisque"] > 80
    assert rejected.reason.startswith("low quality: brisque")


def test_flat_image_has_no_score_and_fails_closed():
    from PIL import Image

    flat = Image.new("RGB", (64, 64), "white")
    [score] = score_images([flat], "brisque")
    assert math.isnan(score)
    [verdict] = build(metric="brisque").check(candidates([flat]))
    assert not verdict.passed and "no brisque score" in verdict.reason


def test_nima_needs_local_weights(tmp_path):
    with pytest.raises(ConfigError, match="needs option 'weights'"):
        build(metric="nima")
    with pytest.raises(ConfigError, match="no such file"):
        build(metric="nima", weights=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize("name", ["fake.pth", "fake.safetensors"])
def test_a_text_file_as_weights_is_one_config_error_even_observing(tmp_path, name):
    pytest.importorskip("timm")
    fake = tmp_path / name
    fake.write_text("not a checkpoint\n")
    quality = build(metric="nima", weights=str(fake))
    with pytest.raises(ConfigError) as err:
        quality.check(candidates(photos(STREET[:1])))
    message = str(err.value)
    assert "\n" not in message and "is not a NIMA checkpoint" in message
    assert "filters (quality): option 'weights'" in message and str(fake) in message


def test_unknown_metric_is_refused():
    with pytest.raises(ConfigError, match="metric"):
        build(metric="musiq")
    with pytest.raises(ConfigError, match="unknown metric 'musiq'"):
        score_images([], "musiq")


@pytest.mark.slow
def test_smoke_nima_scores_in_range_and_threshold_decides(smoke_dir):
    pytest.importorskip("timm")
    weights = smoke_dir / "nima" / "nima-smoke.safetensors"
    images = photos(STREET)
    scores = score_images(images, "nima", str(weights))
    assert len(scores) == 3 and all(1 <= s <= 10 for s in scores)

    # the mean rating of a 10-class distribution: threshold above it rejects
    strict = build(metric="nima", weights=str(weights), threshold=10)
    verdicts = strict.check(candidates(images[:1]))
    assert not verdicts[0].passed and verdicts[0].scores["nima"] == pytest.approx(
        scores[0], abs=1e-3
    )
    lenient = build(metric="nima", weights=str(weights), threshold=1)
    assert lenient.check(candidates(images[:1]))[0].passed


def test_pyiqa_checkpoint_layout_loads(tmp_path):
    """A .pth in pyiqa's own layout ({'params': state}) loads into the network."""
    pytest.importorskip("timm")
    import torch

    from chatroom.plugins.quality import load_nima, nima_network

    network = nima_network("test_efficientnet", 10)
    path = tmp_path / "NIMA_test.pth"
    torch.save({"params": network.state_dict()}, path)
    loaded = load_nima(str(path), "cpu", "test_efficientnet")
    key = "classifier.2.weight"
    assert torch.equal(loaded.state_dict()[key], network.state_dict()[key])
    # pyiqa's module names: the timm backbone, then Flatten, Dropout, Linear, Softmax
    assert {k.split(".")[0] for k in network.state_dict()} == {
        "base_model",
        "classifier",
    }

    with pytest.raises(ConfigError, match="not a NIMA checkpoint"):
        load_nima(str(path), "cpu", "test_resnet")
