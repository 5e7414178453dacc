import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("CHATROOM_SHARED", Path(__file__).parents[2] / "shared"))
REFERENCES = SHARED / "data" / "reference"


@pytest.fixture(scope="session")
def fashion_refs() -> Path:
    folder = REFERENCES / "fashion"
    if not folder.is_dir():
        pytest.fail(f"the shared reference photos are missing: {folder}")
    return folder


@pytest.fixture
def few_refs(tmp_path, fashion_refs) -> Path:
    """Three real fashion photos, downscaled, in a folder of their own."""
    from PIL import Image

    folder = tmp_path / "refs"
    folder.mkdir()
    for path in sorted(fashion_refs.glob("*"))[:3]:
        with Image.open(path) as img:
            img.thumbnail((96, 128))
            img.convert("RGB").save(folder / f"{path.stem}.jpg", quality=90)
    return folder


@pytest.fixture(scope="session")
def smoke_dir(tmp_path_factory) -> Path:
    """The smoke models (``chatroom smoke-models``), written once a session."""
    from chatroom.smoke import write_smoke_models

    root = tmp_path_factory.getbasetemp() / "smoke-models"
    if not (root / "smoke.toml").is_file():
        write_smoke_models(root)
    return root


def reference_photos(domain: str, names) -> dict:
    """The shared reference photos of one domain by file name, as RGB images."""
    from PIL import Image

    folder = REFERENCES / domain
    if not folder.is_dir():
        pytest.fail(f"the shared reference photos are missing: {folder}")
    out = {}
    for name in names:
        with Image.open(folder / name) as image:
            out[name] = image.convert("RGB")
    return out


def candidate(image, index: int = 0):
    """A generated candidate holding ``image``, as filters and annotators get it."""
    from chatroom.models import Candidate, GenerationSettings, PromptSpec

    spec = PromptSpec(index=index, item_id=f"i{index}", prompt="", negative_prompt="")
    return Candidate(
        index=index,
        item_id=f"i{index}",
        spec=spec,
        settings=GenerationSettings(),
        image=image,
    )


def candidates(images) -> list:
    """One candidate per image, indexed in order."""
    return [candidate(image, index) for index, image in enumerate(images)]
