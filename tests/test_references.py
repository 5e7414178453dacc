"""Reference folders: odd and broken images are handled or skipped with a reason."""

import json

import numpy as np
import pytest
from PIL import Image

from chatroom.errors import InputError
from chatroom.references import load_image, load_references


@pytest.fixture
def odd_refs(tmp_path, fashion_refs):
    """Copies of one shared photo in every awkward form a user's folder may hold."""
    source = sorted(fashion_refs.glob("*.jpg"))[0]
    with Image.open(source) as img:
        photo = img.convert("RGB")
    photo.thumbnail((120, 160))
    folder = tmp_path / "odd"
    folder.mkdir()

    photo.save(folder / "plain.jpg", quality=90)
    photo.convert("L").save(folder / "grey.jpg")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    sixteen = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    photo.save(folder / "rotated.jpg", exif=exif)
    data = (folder / "plain.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "notes.jpg").write_text("this is not a picture")
    (folder / "readme.txt").write_text("references for the tests")
    return folder, photo.size


def test_odd_references_are_handled_or_skipped(odd_refs):
    folder, (w, h) = odd_refs

    refs, failures = load_references(folder)

    by_id = {r.id: r for r in refs}
    assert sorted(by_id) == ["cmyk", "deep", "grey", "plain", "rotated"]
    assert (by_id["rotated"].width, by_id["rotated"].height) == (h, w)
    reasons = {f.subject.rsplit("/", 1)[-1]: f.reason for f in failures}
    assert set(reasons) == {"truncated.jpg", "notes.jpg", "readme.txt"}
    assert (
        "truncated" in reasons["truncated.jpg"]
        or "unreadable" in reasons["truncated.jpg"]
    )
    assert reasons["notes.jpg"].startswith("not an image")


def test_odd_images_load_as_8bit_rgb(odd_refs):
    folder, _ = odd_refs
    for name in ("grey.jpg", "cmyk.jpg", "deep.png", "rotated.jpg"):
        img = load_image(folder / name)
        assert img.mode == "RGB"
        arr = np.asarray(img)
        assert arr.dtype == np.uint8 and 20 < arr.mean() < 235, name


def test_a_run_goes_on_past_bad_references(chatroom_run, odd_refs):
    folder, _ = odd_refs
    summary, out = chatroom_run(folder, count=2)

    assert summary.written == 2
    failures = [
        json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()
    ]
    skipped = {
        f["subject"].rsplit("/", 1)[-1] for f in failures if f["kind"] == "reference"
    }
    assert skipped == {"truncated.jpg", "notes.jpg", "readme.txt"}


def test_missing_and_empty_folders_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="references folder not found: .*nowhere"):
        load_references(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="references folder is empty: .*empty"):
        load_references(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.jpg").write_text("nope")
    with pytest.raises(InputError, match="no usable image.*not an image"):
        load_references(tmp_path / "junk")


def test_reference_metadata_follows_the_records(chatroom_run, few_refs):
    lines = [
        {
            "file_name": p.name,
            "source": f"https://example.com/{p.stem}",
            "license": "CC BY-NC 4.0",
        }
        for p in sorted(few_refs.iterdir())
    ]
    (few_refs / "metadata.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines)
    )

    _, out = chatroom_run(few_refs, count=2)

    for line in (out / "metadata.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["reference_sources"]
        for source in record["reference_sources"]:
            assert source["license"] == "CC BY-NC 4.0"
            assert source["source"].endswith(source["id"])


def test_files_sharing_a_stem_keep_their_own_ids(tmp_path, fashion_refs):
    folder = tmp_path / "same"
    folder.mkdir()
    photos = sorted(fashion_refs.glob("*.jpg"))[:2]
    for path, name in zip(photos, ("look.jpg", "look.png"), strict=True):
        with Image.open(path) as img:
            img.convert("RGB").resize((64, 96)).save(folder / name)

    refs, _ = load_references(folder)

    assert sorted(r.id for r in refs) == ["look.jpg", "look.png"]


def test_a_decompression_bomb_is_skipped(tmp_path, few_refs):
    import struct
    import zlib

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")
    (few_refs / "bomb.png").write_bytes(bomb)

    refs, failures = load_references(few_refs)

    assert "bomb" not in {r.id for r in refs}
    (failure,) = failures
    assert failure.subject.endswith("bomb.png") and "refused" in failure.reason


def test_a_config_that_is_not_text_is_one_line(tmp_path):
    from chatroom.config import load_file
    from chatroom.errors import ConfigError

    path = tmp_path / "binary.toml"
    path.write_bytes(b"\xff\xfe[gen")
    with pytest.raises(ConfigError, match="binary.toml: not a UTF-8 text file"):
        load_file(path)
