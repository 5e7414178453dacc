"""Near-duplicates: perceptual hashes (and CLIP) across batches and resumes."""

from __future__ import annotations

import io
import json

import pytest

pytest.importorskip("imagehash")

from chatroom.components import Context, validate_options  # noqa: E402
from chatroom.errors import ChatroomError  # noqa: E402
from chatroom.models import Candidate, GenerationSettings, PromptSpec  # noqa: E402
from chatroom.plugins.near_duplicates import NearDuplicatesFilter  # noqa: E402


def photo(folder, name):
    from PIL import Image

    with Image.open(folder / f"{name}.jpg") as img:
        return img.convert("RGB")


def reencoded(image):
    """Resized to 60% and saved as a low-quality JPEG."""
    from PIL import Image

    small = image.resize((image.width * 3 // 5, image.height * 3 // 5))
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=40)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def candidate(image, number):
    spec = PromptSpec(
        index=number, item_id=f"item{number}", prompt="", negative_prompt=""
    )
    return Candidate(
        index=number,
        item_id=f"item{number}",
        spec=spec,
        settings=GenerationSettings(),
        image=image,
    )


def build(context=None, **raw):
    options = validate_options(NearDuplicatesFilter, "filters.near_duplicates", raw)
    return NearDuplicatesFilter(options, context or Context(domain=None))


def test_copy_is_rejected_across_batches_and_names_the_original(fashion_refs):
    original = photo(fashion_refs, "fashion_10")
    dedup = build()

    [first] = dedup.check([candidate(original, 0)])
    assert first.passed
    other, copy = dedup.check(
        [
            candidate(photo(fashion_refs, "fashion_12"), 1),
            candidate(reencoded(original), 2),
        ]
    )
    assert other.passed and other.scores["phash_distance"] > 10
    assert not copy.passed
    assert copy.reason == "near duplicate of item0"
    assert copy.scores["phash_distance"] <= 6
    assert dedup.usage() == {"images": 3.0, "duplicates": 1.0}


def test_different_photos_all_pass(fashion_refs):
    names = [f"fashion_{n:02d}" for n in range(9, 18)]
    verdicts = build().check(
        [candidate(photo(fashion_refs, n), i) for i, n in enumerate(names)]
    )
    assert all(v.passed for v in verdicts), [v.reason for v in verdicts]


def test_a_kept_image_later_rejected_is_forgotten(fashion_refs, tmp_path):
    from chatroom.journal import REJECTED, Journal

    journal = Journal(tmp_path / "journal.sqlite")
    dedup = build(Context(domain=None, cache=journal, workdir=tmp_path))
    original = photo(fashion_refs, "fashion_10")
    assert dedup.check([candidate(original, 0)])[0].passed
    # an annotator turned item0 down after the filter passed it
    journal.finish(0, "item0", REJECTED, {"item_id": "item0"}, "no mask")
    assert dedup.check([candidate(reencoded(original), 1)])[0].passed
    journal.close()


def test_clip_embeddings_catch_what_the_hash_allows(fashion_refs, monkeypatch):
    torch = pytest.importorskip("torch")
    original = photo(fashion_refs, "fashion_10")
    mirrored = original.transpose(0)  # left-right: a very different hash
    dedup = build(clip_model="scripted")
    same, other = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    script = iter([[same], [same], [other]])
    monkeypatch.setattr(dedup, "_embed", lambda images: next(script))

    assert dedup.check([candidate(original, 0)])[0].passed
    [copy] = dedup.check([candidate(mirrored, 1)])
    assert not copy.passed and copy.reason == "near duplicate of item0"
    assert copy.scores == {"clip_similarity": 1.0}
    [unlike] = dedup.check([candidate(photo(fashion_refs, "fashion_12"), 2)])
    assert unlike.passed and unlike.scores["clip_similarity"] == 0.0


def test_tiny_clip_records_similarity(smoke_dir, fashion_refs):
    pytest.importorskip("transformers")
    dedup = build(clip_model=str(smoke_dir / "clip"), min_similarity=1.0)
    first, second = dedup.check(
        [
            candidate(photo(fashion_refs, "fashion_10"), 0),
            candidate(photo(fashion_refs, "fashion_12"), 1),
        ]
    )
    assert first.passed and first.scores == {}
    assert -1 <= second.scores["clip_similarity"] <= 1


def test_resume_remembers_records_written_before(tmp_path, fashion_refs, monkeypatch):
    """A run stopped after two records; the same command goes on and still catches
    the copy of a record written before the stop."""
    from chatroom.curate import CurateEngine, curate
    from chatroom.journal import WRITTEN

    folder = tmp_path / "images"
    folder.mkdir()
    original = photo(fashion_refs, "fashion_10")
    original.save(folder / "a_original.jpg", quality=92)
    photo(fashion_refs, "fashion_12").save(folder / "b_other.jpg", quality=92)
    reencoded(original).save(folder / "c_copy.jpg")
    config = tmp_path / "dedup.toml"
    config.write_text(
        '[filters.near_duplicates]\nuse = "near_duplicates"\n'
        "[annotators.captions]\nenabled = false\n"
    )
    out = tmp_path / "out"

    load = CurateEngine._stage_generate

    def stop_at_the_copy(self, batch):
        if any(work.index == 2 for work in batch):
            # wait until the first two are written, then stop the run
            for _ in range(600):
                if self.journal.count(WRITTEN) >= 2:
                    break
                import time

                time.sleep(0.05)
            raise ChatroomError("stopped by the test")
        return load(self, batch)

    monkeypatch.setattr(CurateEngine, "_stage_generate", stop_at_the_copy)
    with pytest.raises(ChatroomError, match="stopped by the test"):
        curate(folder, out, config_path=str(config))
    written = [json.loads(line) for line in (out / "metadata.jsonl").open()]
    assert [r["index"] for r in written] == [0, 1]

    monkeypatch.setattr(CurateEngine, "_stage_generate", load)
    summary = curate(folder, out, config_path=str(config))
    assert summary.written == 2
    [rejected] = [json.loads(line) for line in (out / "rejected.jsonl").open()]
    assert rejected["index"] == 2 and rejected["component"] == "near_duplicates"
    assert rejected["reason"] == f"near duplicate of {written[0]['item_id']}"
