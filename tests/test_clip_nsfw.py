"""The CLIP NSFW filter: LAION's head in torch over CLIP image embeddings."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import candidates  # noqa: E402

from chatroom.components import Context, validate_options  # noqa: E402
from chatroom.errors import ConfigError  # noqa: E402
from chatroom.plugins.clip_nsfw import (  # noqa: E402
    LAION_HEADS,
    ClipNsfwFilter,
    convert_keras_head,
    load_head,
    nsfw_head,
    save_head,
)


def squares(count):
    """``count`` small images of different colours."""
    from PIL import Image

    return [Image.new("RGB", (32, 32), (n * 40, 90, 120)) for n in range(count)]


def direction_head(path, dim=32):
    """A one-layer head whose score is sigmoid(8 * x[0]): a known direction."""
    head = nsfw_head((dim, 1))
    with torch.no_grad():
        head.layers[0].weight.zero_()
        head.layers[0].weight[0, 0] = 8.0
        head.layers[0].bias.zero_()
    return save_head(head, path)


def build(smoke_dir, head, **raw):
    raw = {"model": str(smoke_dir / "clip"), "head": str(head), **raw}
    options = validate_options(ClipNsfwFilter, "filters.clip_nsfw", raw)
    return ClipNsfwFilter(options, Context(domain=None))


def test_scripted_embedding_crosses_the_threshold(smoke_dir, tmp_path, monkeypatch):
    nsfw = build(smoke_dir, direction_head(tmp_path / "head.safetensors"))
    unsafe = torch.zeros(32)
    unsafe[0] = 1.0  # sigmoid(8) = 0.9997
    safe = torch.zeros(32)
    safe[1] = 1.0  # sigmoid(0) = 0.5 -> below a 0.6 threshold
    monkeypatch.setattr(nsfw, "embed", lambda images: torch.stack([unsafe, safe]))
    nsfw.options.threshold = 0.6

    flagged, kept = nsfw.check(candidates(squares(2)))
    assert not flagged.passed and flagged.reason.startswith("nsfw: clip score 1.00")
    assert flagged.scores["nsfw"] > 0.99
    assert kept.passed and kept.scores["nsfw"] == pytest.approx(0.5)


def test_runs_end_to_end_on_the_tiny_clip(smoke_dir):
    nsfw = build(smoke_dir, smoke_dir / "clip_nsfw" / "head.safetensors")
    verdicts = nsfw.check(candidates(squares(3)))
    assert len(verdicts) == 3
    assert all(0 <= v.scores["nsfw"] <= 1 for v in verdicts)
    assert nsfw.usage() == {"images": 3.0}
    assert nsfw.describe()["head_widths"] == [32, 32, 32, 1]


def test_head_for_another_clip_fails_closed(smoke_dir, tmp_path):
    head = save_head(nsfw_head(LAION_HEADS["ViT-L/14"]), tmp_path / "l14.safetensors")
    with pytest.raises(ConfigError, match="takes 768-d embeddings but the CLIP model"):
        build(smoke_dir, head)


def test_not_a_head_is_a_config_error(smoke_dir, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ConfigError, match="is not an NSFW head"):
        build(smoke_dir, path)
    with pytest.raises(ConfigError, match="not found"):
        build(smoke_dir, tmp_path / "missing.safetensors")
    two_outputs = save_head(nsfw_head((32, 2)), tmp_path / "two.safetensors")
    with pytest.raises(ConfigError, match="2 outputs"):
        build(smoke_dir, two_outputs)


@pytest.mark.parametrize("name", ["fake.pth", "fake.safetensors"])
def test_a_text_file_as_head_is_one_config_error(smoke_dir, tmp_path, name):
    fake = tmp_path / name
    fake.write_text("not a checkpoint\n")
    with pytest.raises(ConfigError) as err:
        build(smoke_dir, fake)
    message = str(err.value)
    assert "\n" not in message and "is not an NSFW head" in message
    assert "filters (clip_nsfw): option 'head'" in message and str(fake) in message


def test_doctor_names_a_head_that_is_no_checkpoint(smoke_dir, tmp_path):
    from click.testing import CliRunner

    from chatroom.cli import main

    fake = tmp_path / "fake.pth"
    fake.write_text("not a checkpoint\n")
    args = ["doctor", "-c", str(smoke_dir / "smoke.toml")]
    result = CliRunner().invoke(
        main, [*args, "--set", f'filters.clip_nsfw.head="{fake}"']
    )
    assert result.exit_code != 0
    assert "Traceback" not in result.output and "KeyError" not in result.output
    said = "".join(result.output.split())  # the table wraps long messages
    assert "option'head'" in said and "".join(str(fake).split()) in said
    assert "isnotanNSFWhead" in said


def test_laion_torch_port_names_load(tmp_path):
    """LAION's .pth ports name the layers linear_1..n beside norm.mean/variance."""
    widths = LAION_HEADS["ViT-B/32"]
    reference = nsfw_head(widths)
    state = {"norm.mean": torch.randn(512), "norm.variance": torch.rand(512) + 0.5}
    for n, layer in enumerate(reference.layers, 1):
        state[f"linear_{n}.weight"] = layer.weight.detach()
        state[f"linear_{n}.bias"] = layer.bias.detach()
    path = tmp_path / "clip_ViT-B-32_openai_binary_nsfw_head.pth"
    torch.save(state, path)

    head = load_head(path)
    assert head.widths == widths
    x = torch.nn.functional.normalize(torch.randn(4, 512), dim=-1)
    expected = (x - state["norm.mean"]) / state["norm.variance"].sqrt()
    for n, layer in enumerate(reference.layers):
        expected = layer(expected)
        expected = torch.sigmoid(expected) if n == 2 else torch.relu(expected)
    assert torch.allclose(head(x), expected.reshape(-1), atol=1e-6)


def test_keras_h5_converts_to_safetensors(tmp_path):
    """A Keras file laid out as LAION's (normalization, dense layers) converts."""
    h5py = pytest.importorskip("h5py")
    import numpy as np

    rng = np.random.default_rng(0)
    widths = LAION_HEADS["ViT-L/14"]
    path = tmp_path / "clip_autokeras_binary_nsfw.h5"
    kernels = [
        rng.normal(size=(a, b)).astype("float32") * 0.05
        for a, b in zip(widths[:-1], widths[1:], strict=False)
    ]
    mean = rng.normal(size=768).astype("float32") * 0.01
    variance = rng.random(768).astype("float32") + 0.5
    with h5py.File(path, "w") as fh:
        root = fh.create_group("model_weights")
        names = ["input_1", "normalization", "dense", "re_lu", "dense_1"]
        names += ["re_lu_1", "dense_2", "re_lu_2", "dense_3", "classification_head_1"]
        root.attrs["layer_names"] = [n.encode() for n in names]
        for name in names:
            root.create_group(name)
        norm = root["normalization"].create_group("normalization")
        norm["mean:0"], norm["variance:0"], norm["count:0"] = mean, variance, 10
        for n, kernel in enumerate(kernels):
            name = "dense" if n == 0 else f"dense_{n}"
            group = root[name].create_group(name)
            group["kernel:0"] = kernel
            group["bias:0"] = np.zeros(kernel.shape[1], dtype="float32")

    out = convert_keras_head(path, tmp_path / "l14.safetensors")
    head = load_head(out)
    assert head.widths == widths
    x = np.asarray(rng.normal(size=(2, 768)), dtype="float32")
    h = (x - mean) / np.sqrt(variance)
    for n, kernel in enumerate(kernels):
        h = h @ kernel
        h = 1 / (1 + np.exp(-h)) if n == len(kernels) - 1 else np.maximum(h, 0)
    got = head(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(got, h.reshape(-1), atol=1e-5)
