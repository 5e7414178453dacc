"""`chatroom curate`: existing images through the domain's filters and annotators."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from chatroom.cli import main

KEPT = {f"fashion_{n:02d}" for n in range(1, 18)} - {"fashion_07"}


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def main_run(references, out):
    args = ["run", "--references", str(references), "-o", str(out), "-n", "1"]
    return CliRunner().invoke(main, args)


def curate(*args):
    result = CliRunner().invoke(main, ["curate", *map(str, args)])
    return result


def test_the_offline_profile_keeps_the_full_body_photos(
    tmp_path, fashion_refs, monkeypatch
):
    pytest.importorskip("mediapipe")
    pytest.importorskip("nudenet")
    out = tmp_path / "out"

    result = curate(fashion_refs, "-o", out, "--profile", "offline")

    assert result.exit_code == 0, result.output
    records = rows(out / "metadata.jsonl")
    assert {r["references"][0] for r in records} == KEPT
    [rejected] = rows(out / "rejected.jsonl")
    assert rejected["component"] == "pose" and "ankle" in rejected["reason"]
    assert rejected["scores"]["people"] == 1
    assert rejected["scores"]["missing.left_ankle"] == 1
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    assert run["settings"]["count"]["value"] == 17

    for record in records:
        verdicts = {v["filter"]: v for v in record["verdicts"]}
        assert set(verdicts) == {"image_checks", "nudenet", "pose"}
        assert verdicts["pose"]["scores"]["people"] == 1
        assert max(verdicts["nudenet"]["scores"].values()) < 0.4
        assert set(record["masks"]) == {"person", "skeleton"}
        assert record["attributes"]["image"].startswith(record["references"][0])
        assert record["caption"] is None and len(record["keypoints"]) == 18
        pose = json.loads((out / record["pose"]).read_text())
        assert pose["keypoints"] == record["keypoints"]
        with Image.open(out / record["masks"]["person"]) as mask:
            assert mask.mode == "L" and mask.size == (
                record["settings"]["width"],
                record["settings"]["height"],
            )

    # the same command resumes: nothing runs again, nothing is doubled
    from chatroom.plugins.pose import PoseFilter

    def no_second_pass(self, candidates):
        raise AssertionError("a finished image was filtered again")

    monkeypatch.setattr(PoseFilter, "check", no_second_pass)
    again = curate(fashion_refs, "-o", out, "--profile", "offline")

    assert again.exit_code == 0, again.output
    assert rows(out / "metadata.jsonl") == records
    assert len(list((out / "images").iterdir())) == 16


def test_a_bad_file_is_skipped_and_records_name_their_image(tmp_path, fashion_refs):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number in (1, 2):
        with Image.open(fashion_refs / f"fashion_{number:02d}.jpg") as img:
            img.thumbnail((96, 128))
            img.save(folder / f"look_{number}.jpg")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    no_models = [
        "--set",
        "filters.nudenet.enabled=false",
        "--set",
        "filters.pose.enabled=false",
        "--set",
        "annotators.person_mask.enabled=false",
        "--set",
        "annotators.pose_keypoints.enabled=false",
    ]

    result = curate(folder, "-o", out, "--profile", "offline", *no_models)

    assert result.exit_code == 0, result.output
    records = rows(out / "metadata.jsonl")
    assert [r["attributes"] for r in records] == [
        {"image": "look_1.jpg"},
        {"image": "look_2.jpg"},
    ]
    assert records[0]["reference_sources"][0]["path"].endswith("look_1.jpg")
    assert records[0]["settings"]["width"] == 96
    [failure] = rows(out / "failures.jsonl")
    assert failure["kind"] == "reference" and failure["subject"].endswith("notes.txt")
    run = json.loads((out / "run.json").read_text())
    assert set(run["components"]) == {"filter:image_checks"}
    assert run["kind"] == "curate"

    # A run into a curate's folder is told what the folder holds.
    result = main_run(folder, out)
    assert result.exit_code == 2
    assert "holds the output of `chatroom curate`, not of `chatroom run`" in (
        result.output
    )


def test_the_output_folder_may_not_be_the_images_folder(tmp_path, fashion_refs):
    result = curate(fashion_refs, "-o", fashion_refs, "--profile", "offline")

    assert result.exit_code == 2
    assert "holds the references" in result.output
