"""The run folder: chatroom deletes only what it wrote; a refusal touches nothing."""

import json
import logging
from pathlib import Path

import pytest

from chatroom.components import Annotator
from chatroom.engine import Engine
from chatroom.errors import ChatroomError, MissingDependency, ResumeError
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation
from chatroom.resolve import Request
from chatroom.testing import FAKE_CONFIG, FakeGenerator


class PartsAnnotator(Annotator):
    """Gives every candidate two part masks and a pose, as the real annotators do."""

    name = "test_parts"

    def annotate(self, candidates, verdicts):
        from PIL import Image

        notes = []
        for candidate in candidates:
            size = candidate.image.size
            masks = {part: Image.new("L", size, 255) for part in ("upper", "lower")}
            notes.append(Annotation(masks=masks, keypoints=[[1.0, 2.0, 0.9]]))
        return notes


class BrokenAnnotator(Annotator):
    """Cannot start: its library is missing, found once the run has its folder."""

    name = "test_broken"

    def __init__(self, options, context):
        raise MissingDependency("weights_lib", "gpu", self.name)


class PartsPlugin:
    @hookimpl
    def register_annotators(self, register):
        register(PartsAnnotator)
        register(BrokenAnnotator)


@pytest.fixture
def run_parts(tmp_path, chatroom_plugins):
    """Runs the fakes plus an annotator that writes masks/ and poses/."""
    chatroom_plugins.register(PartsPlugin(), name="test-parts")

    def run(references, output, count=3, fresh=False, overrides=(), annotator="parts"):
        config = tmp_path / f"{annotator}.toml"
        config.write_text(FAKE_CONFIG + f"\n[annotators.test_{annotator}]\n")
        request = Request(
            config_path=str(config),
            flags={
                "references": str(references),
                "count": count,
                "output": str(output),
            },
            overrides=list(overrides),
        )
        return Engine(request, plugins=chatroom_plugins, fresh=fresh).run()

    return run


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under the folder with its bytes (None for a folder)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- --fresh and resume keep what the user put in the subfolders ----------------------


@pytest.mark.parametrize(
    "foreign", ["images/keep.txt", "masks/mine/hand_mask.png", "poses/notes.json"]
)
def test_fresh_refuses_a_folder_with_a_users_file_in_a_subfolder(
    run_parts, few_refs, tmp_path, foreign
):
    out = tmp_path / "out"
    run_parts(few_refs, out, count=2)
    (out / foreign).parent.mkdir(parents=True, exist_ok=True)
    (out / foreign).write_bytes(b"precious")
    before = snapshot(out)

    with pytest.raises(ResumeError) as err:
        run_parts(few_refs, out, count=2, fresh=True)

    message = str(err.value)
    assert foreign in message and "\n" not in message
    assert snapshot(out) == before


def test_fresh_refuses_a_users_file_beside_the_run(run_parts, few_refs, tmp_path):
    out = tmp_path / "out"
    run_parts(few_refs, out, count=1)
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("an old report")
    (out / "notes.md").write_text("my notes")
    before = snapshot(out)

    with pytest.raises(ResumeError, match="notes.md"):
        run_parts(few_refs, out, count=1, fresh=True)

    assert snapshot(out) == before


def test_fresh_clears_everything_the_run_wrote(run_parts, few_refs, tmp_path):
    out = tmp_path / "out"
    run_parts(few_refs, out, count=2)
    old = {r["item_id"] for r in rows(out / "metadata.jsonl")}
    (out / "report" / "thumbs").mkdir(parents=True)
    (out / "report" / "index.html").write_text("an old report")
    (out / "report" / "thumbs" / f"{sorted(old)[0]}.jpg").write_bytes(b"jpg")

    summary = run_parts(few_refs, out, count=2, fresh=True, overrides=["seed=9"])

    assert summary.written == 2
    new = {r["item_id"] for r in rows(out / "metadata.jsonl")}
    assert not old & new
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert not [f for f in files if any(i in f for i in old)]
    assert not (out / "report").exists()


def test_a_resume_keeps_a_users_files_and_removes_a_killed_writes_leftovers(
    run_parts, few_refs, tmp_path
):
    out = tmp_path / "out"
    run_parts(few_refs, out, count=2)
    users = ["images/keep.txt", "masks/mine/hand_mask.png", "poses/notes.json"]
    for rel in users:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"precious")
    # what a write killed half-way leaves: files of an item the journal never finished
    leftovers = [
        "images/0123456789abcdef.png",
        "images/.tmp-k1l2m3",
        "masks/0123456789abcdef/upper.png",
        "poses/0123456789abcdef.json",
    ]
    for rel in leftovers:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(b"half")

    summary = run_parts(few_refs, out, count=3)

    assert summary.written == 3
    for rel in users:
        assert (out / rel).read_bytes() == b"precious", rel
    for rel in leftovers:
        assert not (out / rel).exists(), rel
    for row in rows(out / "metadata.jsonl"):
        assert (out / row["file_name"]).is_file()
        assert all((out / m).is_file() for m in row["masks"].values())
        assert (out / row["pose"]).is_file()


# --- a refused command leaves the folder exactly as it was ----------------------


def test_a_folder_of_someone_elses_files_is_left_as_it_was(
    chatroom_run, few_refs, tmp_path
):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    before = snapshot(out)

    for fresh in (False, True):
        with pytest.raises(ResumeError, match="thesis.txt"):
            chatroom_run(few_refs, count=1, output=out, fresh=fresh)
        assert snapshot(out) == before


def test_a_project_folder_is_left_as_it_was_with_fresh(
    chatroom_run, few_refs, tmp_path
):
    repo = tmp_path / "repo"
    (repo / "core").mkdir(parents=True)
    (repo / "core" / "engine.py").write_text("code")
    (repo / "pyproject.toml").write_text("[project]")
    before = snapshot(repo)

    with pytest.raises(ResumeError, match="no chatroom run wrote"):
        chatroom_run(few_refs, count=1, output=repo, fresh=True)

    assert snapshot(repo) == before


def test_a_run_refused_for_its_settings_leaves_no_trace(
    chatroom_run, few_refs, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    new = tmp_path / "new" / "out"

    for out in (empty, new):
        with pytest.raises(ChatroomError, match="min_std"):
            chatroom_run(
                few_refs,
                count=1,
                output=out,
                overrides=['filters.image_checks.min_std="lots"'],
            )
    assert snapshot(empty) == {}
    assert not (tmp_path / "new").exists()


def test_a_run_that_cannot_start_leaves_no_journal_and_no_lock(
    run_parts, few_refs, tmp_path
):
    empty = tmp_path / "empty"
    empty.mkdir()
    new = tmp_path / "new" / "out"

    for out in (empty, new):
        with pytest.raises(MissingDependency, match="weights_lib"):
            run_parts(few_refs, out, count=1, annotator="broken")
    assert snapshot(empty) == {}
    assert not (tmp_path / "new").exists()


def test_a_refused_resume_leaves_the_run_as_it_was(chatroom_run, few_refs):
    _, out = chatroom_run(few_refs, count=2)
    before = snapshot(out)

    with pytest.raises(ResumeError, match="other settings"):
        chatroom_run(few_refs, count=2, overrides=["seed=5"])

    assert snapshot(out) == before


# --- a record whose image was deleted by hand --------------------------------------


def test_a_record_whose_image_was_deleted_is_made_again(chatroom_run, few_refs, caplog):
    _, out = chatroom_run(few_refs, count=4)
    records = rows(out / "metadata.jsonl")
    lost = records[1]
    (out / lost["file_name"]).unlink()
    FakeGenerator.calls.clear()

    with caplog.at_level(logging.WARNING, logger="chatroom"):
        summary, _ = chatroom_run(few_refs, count=4)

    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(lost["item_id"] in w and lost["file_name"] in w for w in warnings)
    assert summary.status == "complete" and summary.written == 4
    assert [seed for _, seed in FakeGenerator.calls] == [lost["seed"]]
    after = rows(out / "metadata.jsonl")
    assert [r["item_id"] for r in after] == [r["item_id"] for r in records]
    assert all((out / r["file_name"]).is_file() for r in after)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{r['item_id']}.png" for r in records
    )
