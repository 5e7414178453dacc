"""Graphonomy: the published checkpoint's layout, the masks, and a smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import candidate
from PIL import Image

from chatroom.components import Context, validate_options
from chatroom.errors import ConfigError
from chatroom.plugins.graphonomy import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LABELS,
    MIRROR,
    PALETTE,
    Architecture,
    GraphonomyAnnotator,
    load_network,
    normalized_adjacency,
    write_smoke_checkpoint,
)

torch = pytest.importorskip("torch")

# A narrow network of the same layout, for fast tests of everything around it.
TINY = Architecture(
    hidden_layers=8,
    entry=(4, 8, 8, 16, 16),
    middle_blocks=1,
    exit=(16, 16, 16, 16),
    aspp=8,
    low_level=4,
)


def annotator(checkpoint, **extra):
    raw = {"checkpoint": str(checkpoint), "device": "cpu", **extra}
    options = validate_options(GraphonomyAnnotator, "annotators.graphonomy", raw)
    return GraphonomyAnnotator(options, Context(domain=None))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphonomy-tiny")
    write_smoke_checkpoint(folder, arch=TINY)
    return folder


def noise(width, height, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3))
    return Image.fromarray(pixels.astype(np.uint8))


# --- the published checkpoint ----------------------------------------------------


def test_smoke_checkpoint_has_the_published_layout_and_loads_strictly(smoke_dir):
    path = smoke_dir / "graphonomy" / CHECKPOINT_FILE
    assert not (path.parent / CONFIG_FILE).exists()  # full size, as published
    state = torch.load(str(path), weights_only=True)
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    # names and shapes of the authors' deeplab_xception_transfer_projection_savemem
    # (n_classes=20, source_classes=7, hidden_layers=128)
    # 896 tensors in the module's state dict, less 146 batch-norm batch counters
    assert len(shapes) == 750
    assert not any(key.endswith("num_batches_tracked") for key in shapes)
    expected = {
        "xception_features.conv1.weight": (32, 3, 3, 3),
        "xception_features.block1.rep.0.pointwise.weight": (128, 64, 1, 1),
        "xception_features.block2.block2_lastconv.1.depthwise.weight": (256, 1, 3, 3),
        "xception_features.block3.skip.weight": (728, 256, 1, 1),
        "xception_features.block19.rep.5.pointwise_bn.running_var": (728,),
        "xception_features.block20.rep.5.pointwise.weight": (1024, 1024, 1, 1),
        "xception_features.block20.skip.weight": (1024, 728, 1, 1),
        "xception_features.conv5.pointwise.weight": (2048, 1536, 1, 1),
        "aspp1.atrous_convolution.weight": (256, 2048, 1, 1),
        "aspp1.bn.running_mean": (256,),
        "aspp4.atrous_convolution.depthwise.weight": (2048, 1, 3, 3),
        "global_avg_pool.1.weight": (256, 2048, 1, 1),
        "concat_projection_conv1.weight": (256, 1280, 1, 1),
        "feature_projection_conv1.weight": (48, 256, 1, 1),
        "decoder.0.atrous_convolution.pointwise.weight": (256, 304, 1, 1),
        "target_featuremap_2_graph.pre_fea": (256, 20),
        "target_graph_conv3.weight": (128, 128),
        "target_graph_2_fea.node_fea_for_res": (256, 1),
        "target_graph_2_fea.node_fea_for_hidden": (128, 1),
        "target_skip_conv.0.bias": (256,),
        "source_featuremap_2_graph.pre_fea": (256, 7),
        "source_graph_conv3.weight": (128, 128),
        "transpose_graph.adj": (20, 7),
        "fc_graph.weight": (384, 128),
        "semantic.weight": (20, 256, 1, 1),
        "semantic.bias": (20,),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert "xception_features.block21.rep.1.pointwise.weight" not in shapes

    network = load_network(path, "annotators (graphonomy)")
    assert sum(p.numel() for p in network.parameters()) == pytest.approx(41.4e6, 0.01)
    loaded = network.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_a_data_parallel_checkpoint_loads_and_a_wrong_one_is_named(tiny, tmp_path):
    state = torch.load(str(tiny / CHECKPOINT_FILE), weights_only=True)
    (tmp_path / CONFIG_FILE).write_text((tiny / CONFIG_FILE).read_text())

    wrapped = tmp_path / "wrapped.pth"
    torch.save({f"module.{key}": value for key, value in state.items()}, str(wrapped))
    assert load_network(wrapped, "x") is not None

    missing = tmp_path / "missing.pth"
    torch.save({k: v for k, v in state.items() if k != "fc_graph.weight"}, str(missing))
    with pytest.raises(ConfigError, match="missing 'fc_graph.weight'"):
        load_network(missing, "annotators (graphonomy)")

    extra = tmp_path / "extra.pth"
    torch.save({**state, "classifier.weight": torch.zeros(1)}, str(extra))
    with pytest.raises(ConfigError, match="unexpected 'classifier.weight'"):
        load_network(extra, "annotators (graphonomy)")

    # the published architecture does not fit the narrow weights: named, one line
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(ConfigError) as caught:
        load_network(wrapped, "annotators (graphonomy)")
    assert "\n" not in str(caught.value)


def test_the_graphs_are_normalised_adjacencies():
    adjacency = normalized_adjacency([(0, 1), (1, 2), (2, 2)], 3)
    # D^-1/2 (A + I) D^-1/2 with degrees 2, 3, 3 (the self-loop counts once)
    expected = np.array(
        [
            [1 / 2, 1 / 6**0.5, 0],
            [1 / 6**0.5, 1 / 3, 1 / 3],
            [0, 1 / 3, 2 / 3],
        ]
    )
    assert adjacency == pytest.approx(expected)


def test_the_mirror_swaps_left_and_right_labels():
    assert [LABELS[i] for i in MIRROR][14:] == [
        "right_arm",
        "left_arm",
        "right_leg",
        "left_leg",
        "right_shoe",
        "left_shoe",
    ]
    assert MIRROR[:14] == tuple(range(14))
    assert len(LABELS) == len(PALETTE) == 20


# --- the masks --------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"flip": False}, {"scales": [1.0, 0.5, 1.5]}],
    ids=["flip", "plain", "multi-scale"],
)
def test_masks_have_the_original_size_and_valid_values(tiny, options):
    component = annotator(tiny, min_person_share=0, **options)
    image = noise(70, 45)
    (note,) = component.annotate([candidate(image)], [[]])

    assert set(note.masks) == {"parts", "clothing", "person"}
    assert all(mask.size == (70, 45) for mask in note.masks.values())
    parts = note.masks["parts"]
    assert parts.mode == "P"
    assert parts.getpalette()[: 3 * 20] == [v for colour in PALETTE for v in colour]
    labels = np.asarray(parts)
    assert labels.shape == (45, 70) and labels.max() < len(LABELS)
    for name in ("clothing", "person"):
        assert note.masks[name].mode == "L"
        assert set(np.unique(np.asarray(note.masks[name]))) <= {0, 255}
    person = np.asarray(note.masks["person"]) == 255
    assert (person == (labels > 0)).all()
    clothing = np.asarray(note.masks["clothing"]) == 255
    clothing_ids = [LABELS.index(n) for n in component.options.clothing]
    assert (clothing == np.isin(labels, clothing_ids)).all()
    assert note.qa["labels"] == list(LABELS)
    assert note.qa["person_share"] == pytest.approx(person.mean(), abs=1e-4)


def test_the_mirror_image_parses_to_mirrored_labels(tiny):
    """With flip on, parsing is symmetric: the mirror image's label map is the
    image's, mirrored, with left and right swapped."""
    component = annotator(tiny)
    image = noise(48, 64, seed=3)
    labels = component.parser.parse(image)
    mirrored = component.parser.parse(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    expected = np.asarray(MIRROR, dtype=np.uint8)[labels[:, ::-1]]
    assert (mirrored == expected).mean() > 0.99  # ties may break either way


def test_an_empty_person_mask_is_rejected(tiny, monkeypatch):
    component = annotator(tiny)
    monkeypatch.setattr(
        component.parser, "parse", lambda image: np.zeros((20, 10), np.uint8)
    )
    (note,) = component.annotate([candidate(Image.new("RGB", (10, 20)))], [[]])
    assert note.rejected == "person mask is empty"
    assert note.qa["person_share"] == 0.0
    assert "parts" in note.masks  # kept for a look in observe mode


def test_a_missing_checkpoint_says_which_file_to_provide(tmp_path):
    for value in ("", str(tmp_path)):
        component = annotator(value)
        with pytest.raises(ConfigError) as caught:
            component.annotate([candidate(Image.new("RGB", (8, 8)))], [[]])
        message = str(caught.value)
        assert "\n" not in message and CHECKPOINT_FILE in message
        assert message.startswith("annotators (graphonomy)")


def test_a_text_file_as_checkpoint_is_named_unreadable(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    path.write_text("not a checkpoint\n")
    component = annotator(str(path))
    with pytest.raises(ConfigError) as err:
        component.annotate([candidate(Image.new("RGB", (8, 8)))], [[]])
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert message.startswith("annotators (graphonomy): option 'checkpoint'")
    assert "not a torch checkpoint" in message


def test_options_name_unknown_labels():
    with pytest.raises(ConfigError, match="upper_clothes"):
        validate_options(
            GraphonomyAnnotator, "annotators.graphonomy", {"clothing": ["upper_cloth"]}
        )
    with pytest.raises(ConfigError, match="scales"):
        validate_options(GraphonomyAnnotator, "annotators.graphonomy", {"scales": [0]})


# --- a smoke run ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_smoke_run_writes_graphonomy_masks_for_every_record(
    smoke_dir, few_refs, tmp_path
):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "chatroom.cli", "run", "-c", smoke_dir / "smoke.toml"]
        + ["--domain", "fashion", "--references", few_refs, "-n", "2", "-o", out],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads(line) for line in (out / "metadata.jsonl").open()]
    assert len(records) == 2
    for record in records:
        assert {"parts", "clothing", "person"} <= set(record["masks"])
        image = Image.open(out / record["file_name"])
        for name in ("parts", "clothing", "person"):
            with Image.open(out / record["masks"][name]) as mask:
                assert mask.size == image.size
        with Image.open(out / record["masks"]["parts"]) as parts:
            assert parts.mode == "P" and np.asarray(parts).max() < len(LABELS)
        assert record["qa"]["graphonomy.labels"] == list(LABELS)
        verdicts = {v["filter"]: v for v in record["verdicts"]}
        assert verdicts["openpose"]["observed"]

    info = json.loads((out / "run.json").read_text())
    assert {"filter:openpose", "annotator:graphonomy"} <= set(
        info["observe"]["components"]
    )

    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 2
    assert ds[0]["masks"]["parts"].startswith("masks/")


def test_the_plugin_modules_import_no_heavy_library():
    code = (
        "import sys, chatroom.plugins.graphonomy, chatroom.plugins.openpose\n"
        "heavy = [m for m in ('torch', 'controlnet_aux', 'cv2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
