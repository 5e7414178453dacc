"""Exporting a finished run as Parquet and WebDataset shards, and reading them back."""

import fcntl
import hashlib
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from chatroom import export
from chatroom.components import Annotator
from chatroom.errors import InputError, MissingDependency
from chatroom.hookspecs import hookimpl
from chatroom.models import Annotation

COUNT = 7
WIDTH, HEIGHT = 64, 96  # the fake generator's size in chatroom.testing.FAKE_CONFIG


class Masker(Annotator):
    """Gives even items two part masks and a pose; its QA values vary in type."""

    name = "masker"
    description = "two flat masks and one keypoint on every even item"

    def annotate(self, candidates, verdicts):
        notes = []
        for candidate in candidates:
            if candidate.index % 2:
                notes.append(Annotation(annotator="m", qa={"parts": "none"}))
                continue
            size = candidate.image.size
            notes.append(
                Annotation(
                    annotator="m",
                    masks={
                        "upper": Image.new("L", size, 255),
                        "lower": Image.new("L", size, 0),
                    },
                    keypoints=[[10.0, 20.0, 0.9]],
                    qa={"parts": 2},
                )
            )
        return notes


class OffersMasker:
    @hookimpl
    def register_annotators(self, register):
        register(Masker)


@pytest.fixture
def run7(chatroom_run, chatroom_plugins, few_refs):
    """A finished run of seven records; the even ones have masks and a pose."""
    chatroom_plugins.register(OffersMasker(), name="masker")
    summary, out = chatroom_run(
        few_refs, count=COUNT, overrides=['annotators.m.use="masker"']
    )
    assert summary.status == "complete"
    return out


def metadata(out):
    rows = [json.loads(line) for line in (out / "metadata.jsonl").open()]
    return sorted(rows, key=lambda row: row["index"])


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_manifest(result, extension):
    manifest = json.loads(result.manifest.read_text())
    assert [s["name"] for s in manifest["shards"]] == [
        f"shard-{n:05d}.{extension}" for n in range(3)
    ]
    assert [s["records"] for s in manifest["shards"]] == [3, 3, 1]
    assert manifest["records"] == COUNT and manifest["skipped"] == []
    for shard in manifest["shards"]:
        assert sha256(result.dest / shard["name"]) == shard["sha256"]
    assert sorted(p.name for p in result.dest.iterdir()) == sorted(
        [export.MANIFEST, *(s["name"] for s in manifest["shards"])]
    )
    return manifest


def test_parquet_shards_read_back_with_pyarrow(run7, tmp_path):
    import pyarrow.parquet as pq

    before = sorted(p.relative_to(run7) for p in run7.rglob("*"))
    result = export.export_parquet(run7, tmp_path / "pq", shard_size=3)

    assert sorted(p.relative_to(run7) for p in run7.rglob("*")) == before
    manifest = check_manifest(result, "parquet")
    rows = metadata(run7)
    table = pq.read_table(result.dest)
    assert table.num_rows == COUNT
    assert set(table.column_names) == {*rows[0], "image", "mask_images"}
    assert table.column_names == manifest["columns"]
    assert table.column("item_id").to_pylist() == [r["item_id"] for r in rows]

    # QA values differ in type across rows, so that column is JSON text.
    assert "qa" in manifest["json_columns"]
    assert table.schema.field("qa").metadata == {b"chatroom.encoding": b"json"}
    for got, row in zip(table.to_pylist(), rows, strict=True):
        image = Image.open(io.BytesIO(got["image"]))
        assert image.format == "PNG" and image.size == (WIDTH, HEIGHT)
        assert json.loads(got["qa"]) == row["qa"]
        for name in ("prompt", "seed", "settings", "bank_entries", "references"):
            assert got[name] == row[name], name
        assert [m["part"] for m in got["mask_images"]] == sorted(row["masks"])
        for mask in got["mask_images"]:
            with Image.open(io.BytesIO(mask["png"])) as png:
                assert png.size == (WIDTH, HEIGHT) and png.mode == "L"
        if row["masks"]:
            assert got["masks"] == row["masks"]
            assert got["keypoints"] == row["keypoints"] == [[10.0, 20.0, 0.9]]
    assert sum(1 for row in rows if row["masks"]) == 4

    # Shards are for sharing: references by file name, never by a local directory.
    for got, row in zip(table.to_pylist(), rows, strict=True):
        local = [s["path"] for s in row["reference_sources"]]
        assert all("/" in path for path in local)
        assert [s["path"] for s in got["reference_sources"]] == [
            path.rsplit("/", 1)[-1] for path in local
        ]


def test_a_run_without_records_is_not_exported(run7, tmp_path):
    for row in metadata(run7):
        (run7 / row["file_name"]).unlink()

    with pytest.raises(InputError, match="no records to export .*image missing"):
        export.export_parquet(run7, tmp_path / "pq")
    assert not (tmp_path / "pq").exists()


def test_webdataset_shards_read_back_with_webdataset(run7, tmp_path):
    import webdataset

    result = export.export_webdataset(run7, tmp_path / "wds", shard_size=3)

    manifest = check_manifest(result, "tar")
    rows = metadata(run7)
    urls = [str(result.dest / s["name"]) for s in manifest["shards"]]
    samples = list(webdataset.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == COUNT
    assert [s["__key__"] for s in samples] == [r["item_id"] for r in rows]
    for sample, row in zip(samples, rows, strict=True):
        assert sample["json"] == export._portable(row)  # the whole row, every key
        assert sample["png"].size == (WIDTH, HEIGHT)
        masks = sorted(k for k in sample if k.startswith("mask."))
        assert masks == [f"mask.{part}.png" for part in sorted(row["masks"])]
        for key in masks:
            assert sample[key].size == (WIDTH, HEIGHT)
        if row["pose"]:
            assert sample["pose.json"] == {"keypoints": row["keypoints"]}
        else:
            assert "pose.json" not in sample

    # The same run exports to the same bytes.
    again = export.export_webdataset(run7, tmp_path / "wds2", shard_size=3)
    assert [s["sha256"] for s in again.shards] == [
        s["sha256"] for s in manifest["shards"]
    ]


def test_a_record_whose_image_is_missing_is_skipped_and_listed(run7, tmp_path):
    rows = metadata(run7)
    (run7 / rows[2]["file_name"]).unlink()

    result = export.export_webdataset(run7, tmp_path / "wds", shard_size=3)

    assert result.records == COUNT - 1
    manifest = json.loads(result.manifest.read_text())
    assert [s["records"] for s in manifest["shards"]] == [3, 3]
    [skipped] = manifest["skipped"]
    assert skipped["item_id"] == rows[2]["item_id"] and skipped["index"] == 2
    assert skipped["reason"] == f"image missing: {rows[2]['file_name']}"


def test_a_killed_export_leaves_no_half_shard(run7, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    dest = tmp_path / "pq"
    export.export_parquet(run7, dest, shard_size=2)  # an earlier export: 4 shards
    real_read, calls = export._read, []

    def dies_in_the_second_shard(path):
        calls.append(path)
        if len(calls) == 9:  # items 0 to 2 and their masks take 7 reads
            raise KeyboardInterrupt
        return real_read(path)

    monkeypatch.setattr(export, "_read", dies_in_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        export.export_parquet(run7, dest, shard_size=3)

    # No manifest while shards are being replaced, no temporary file, and every
    # shard under a final name is whole.
    names = sorted(p.name for p in dest.iterdir())
    assert export.MANIFEST not in names and export.INCOMPLETE in names
    assert not [n for n in names if n.startswith(".")]
    shards = [n for n in names if n.startswith("shard-")]
    rows = {name: pq.read_metadata(dest / name).num_rows for name in shards}
    assert rows == {  # the new first shard, and the earlier export's others
        "shard-00000.parquet": 3,
        "shard-00001.parquet": 2,
        "shard-00002.parquet": 2,
        "shard-00003.parquet": 1,
    }

    monkeypatch.setattr(export, "_read", real_read)
    result = export.export_parquet(run7, dest, shard_size=3)
    assert sorted(p.name for p in dest.iterdir()) == [
        export.MANIFEST,
        *(s["name"] for s in result.shards),
    ]
    assert pq.read_table(dest).num_rows == COUNT


def test_only_a_finished_run_is_exported(run7, tmp_path):
    with pytest.raises(InputError, match="not a chatroom run"):
        export.export_parquet(tmp_path / "refs", tmp_path / "pq")

    info = json.loads((run7 / "run.json").read_text())
    (run7 / "run.json").write_text(json.dumps({**info, "status": "running"}))
    with pytest.raises(InputError, match=r"unfinished run \(status: running\)"):
        export.export_webdataset(run7, tmp_path / "wds")
    assert not (tmp_path / "wds").exists()


def test_parquet_without_pyarrow_names_the_extra(run7, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MissingDependency, match=r"pip install 'chatroom\[parquet\]'"):
        export.export_parquet(run7, tmp_path / "pq")
    assert not (tmp_path / "pq").exists()


def test_a_run_in_progress_is_refused(run7, tmp_path):
    with open(run7 / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(InputError, match="in use by a chatroom run"):
            export.export_parquet(run7, tmp_path / "pq")


def test_the_export_folder_must_hold_nothing_else(run7, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"holds no finished export"):
        export.export_parquet(run7, tmp_path / "mine")
    with pytest.raises(InputError, match="inside its data"):
        export.export_parquet(run7, run7 / "images" / "export")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_files_that_only_look_like_shards_are_left_alone(run7, tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    (folder / "shard-00000.parquet").write_text("someone's data")
    (folder / "shard-00007.tar").write_text("someone's data")
    with pytest.raises(InputError, match=r"holds no finished export"):
        export.export_parquet(run7, folder, shard_size=3)
    assert (folder / "shard-00000.parquet").read_text() == "someone's data"
    assert (folder / "shard-00007.tar").read_text() == "someone's data"


def chatroom_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "chatroom.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def test_cli_exports_a_run(run7, tmp_path):
    result = chatroom_cli(
        "export", str(run7), "--format", "parquet", "--shard-size", "3", cwd=tmp_path
    )

    assert result.returncode == 0, result.stderr
    dest = tmp_path / f"{run7.name}-parquet"
    assert result.stdout.startswith(f"exported {COUNT} records in 3 shards to {dest}")
    manifest = json.loads((dest / export.MANIFEST).read_text())
    assert manifest["records"] == COUNT and manifest["format"] == "parquet"


def test_cli_refuses_a_folder_that_is_not_a_run(few_refs, tmp_path):
    result = chatroom_cli(
        "export", str(few_refs), "--format", "webdataset", cwd=tmp_path
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {few_refs} is not a chatroom run (it has no run.json)"
    ]
    assert not (tmp_path / "refs-webdataset").exists()
