"""Export a finished run as Parquet or WebDataset shards, with a manifest.

The records exported are the rows of ``metadata.jsonl``, which the engine rebuilds
from the journal when a run ends. Shards hold at most ``shard_size`` records, in the
order of their index; each is written under a temporary name and renamed when it is
complete. ``_manifest.json`` is written last: it lists the shards with their record
counts and sha256, and every record that was skipped, with the reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from . import __version__, store
from .errors import InputError, MissingDependency

log = logging.getLogger(__name__)

FORMATS = ("parquet", "webdataset")
EXTENSIONS = {"parquet": "parquet", "webdataset": "tar"}
# A leading "_": pyarrow and datasets skip the manifest when they read the folder.
MANIFEST = "_manifest.json"
# Marks a folder whose export is being (re)written; gone once the manifest is.
INCOMPLETE = "_incomplete.json"
SHARD_PATTERN = re.compile(r"shard-\d{5}\.(parquet|tar)")
FINISHED = ("complete", "budget exhausted")
DEFAULT_SHARD_SIZE = 1000
ROW_GROUP_SIZE = 100  # records per Parquet row group: bounds memory while writing
IMAGE_COLUMN = "image"
MASKS_COLUMN = "mask_images"
JSON_ENCODING = b"json"  # field metadata "chatroom.encoding" of a JSON text column
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class Sample:
    """One record to export: its metadata row and the files it owns."""

    row: dict[str, Any]
    index: int
    key: str  # the item id, made safe for a WebDataset key (no dots)
    image: Path
    masks: dict[str, Path] = field(default_factory=dict)
    pose: Path | None = None


@dataclass
class ExportResult:
    format: str
    dest: Path
    records: int
    shards: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    manifest: Path


def export_run(
    run_dir: str | Path,
    format: str,
    dest: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExportResult:
    """Export a finished run in ``format`` ("parquet" or "webdataset")."""
    if format == "parquet":
        return export_parquet(run_dir, dest, shard_size)
    if format == "webdataset":
        return export_webdataset(run_dir, dest, shard_size)
    raise InputError(
        f"unknown export format {format!r}: use one of {', '.join(FORMATS)}"
    )


def export_parquet(
    run_dir: str | Path,
    dest: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExportResult:
    """Parquet shards: every metadata column, the image bytes, the mask PNGs.

    Columns whose values have one shape in every row keep native Arrow types
    (structs, lists); the others are JSON text, marked in their field metadata.
    """
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "pyarrow", "parquet", "export --format parquet"
        ) from None
    return _export(Path(run_dir), "parquet", dest, shard_size, _ParquetShards())


def export_webdataset(
    run_dir: str | Path,
    dest: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExportResult:
    """WebDataset tar shards: ``<key>.png``, ``<key>.json`` (the whole row),
    ``<key>.mask.<part>.png`` per mask and ``<key>.pose.json`` when there is a pose.
    """
    return _export(Path(run_dir), "webdataset", dest, shard_size, _TarShards())


# --- the steps shared by both formats --------------------------------------------


def _export(run_dir, format, dest, shard_size, shards) -> ExportResult:
    if shard_size < 1:
        raise InputError(f"shard size must be 1 or more, not {shard_size}")
    with _holding(run_dir):
        info = _finished_run(run_dir)
        dest = _destination(run_dir, dest, format)
        samples, skipped = _collect(run_dir)
        if not samples:
            why = (
                f" ({len(skipped)} skipped, first: {skipped[0]['reason']})"
                if skipped
                else ""
            )
            raise InputError(f"{run_dir}: the run has no records to export{why}")
        extra = shards.prepare(samples)

        # From here on the folder changes: no manifest until the shards are whole.
        try:
            dest.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"export folder cannot be made: {dest} ({exc.strerror})"
            ) from None
        store.atomic_write_text(dest / INCOMPLETE, json.dumps({"run": str(run_dir)}))
        (dest / MANIFEST).unlink(missing_ok=True)
        for leftover in dest.glob(store.TMP_PREFIX + "*"):
            leftover.unlink()

        written = []
        for number, start in enumerate(range(0, len(samples), shard_size)):
            chunk = samples[start : start + shard_size]
            name = f"shard-{number:05d}.{EXTENSIONS[format]}"
            digest, size = _write_atomically(
                dest / name, lambda tmp, chunk=chunk: shards.write(tmp, chunk)
            )
            written.append(
                {
                    "name": name,
                    "records": len(chunk),
                    "sha256": digest,
                    "bytes": size,
                    "first_index": chunk[0].index,
                    "last_index": chunk[-1].index,
                }
            )
            log.info("wrote %s (%d records)", name, len(chunk))

        manifest = {
            "format": format,
            "chatroom": __version__,
            "run": {
                "path": str(run_dir.resolve()),
                "status": info.get("status"),
                "fingerprint": info.get("fingerprint"),
                "updated": info.get("updated"),
            },
            "shard_size": shard_size,
            "records": len(samples),
            "shards": written,
            "skipped": skipped,
            **extra,
        }
        store.atomic_write_text(
            dest / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        )
        (dest / INCOMPLETE).unlink(missing_ok=True)

        # Shards of an earlier, larger export in the same folder are stale now.
        names = {shard["name"] for shard in written}
        for path in dest.iterdir():
            if SHARD_PATTERN.fullmatch(path.name) and path.name not in names:
                path.unlink()

    return ExportResult(
        format=format,
        dest=dest,
        records=len(samples),
        shards=written,
        skipped=skipped,
        manifest=dest / MANIFEST,
    )


def _destination(run_dir: Path, dest, format: str) -> Path:
    """The export folder: new, empty, or holding an earlier export and nothing else."""
    run = run_dir.resolve()
    dest = Path(dest) if dest else run.parent / f"{run.name}-{format}"
    if dest.exists() and not dest.is_dir():
        raise InputError(f"export folder {dest} is a file: choose a folder with -o")
    target = dest.resolve()
    if target == run or any(target.is_relative_to(run / d) for d in store.DATA_DIRS):
        raise InputError(
            f"export folder {dest} is the run folder or inside its data: choose "
            "another -o"
        )
    ours = (dest / MANIFEST).is_file() or (dest / INCOMPLETE).is_file()
    if dest.is_dir() and any(dest.iterdir()) and not ours:
        # Shard-like names without our manifest may be anyone's: touch nothing.
        names = sorted(p.name for p in dest.iterdir())
        more = "..." if len(names) > 3 else ""
        raise InputError(
            f"export folder {dest} is not empty and holds no finished export "
            f"({', '.join(names[:3])}{more}); choose an empty or new folder"
        )
    if dest.is_dir():
        stray = sorted(
            p.name
            for p in dest.iterdir()
            if p.name not in (MANIFEST, INCOMPLETE)
            and not SHARD_PATTERN.fullmatch(p.name)
            and not p.name.startswith(store.TMP_PREFIX)
        )
        if stray:
            more = "..." if len(stray) > 3 else ""
            raise InputError(
                f"export folder {dest} holds files that no export wrote "
                f"({', '.join(stray[:3])}{more}); choose an empty or new folder"
            )
    return dest


@contextmanager
def _holding(run_dir: Path) -> Iterator[None]:
    """Share the run folder's lock, so that no run starts or resumes meanwhile."""
    try:
        handle = open(run_dir / store.LOCK_FILE)  # noqa: SIM115 - closed below
    except OSError:
        yield  # no lock file (or none we may read): no run holds the folder
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"{run_dir} is in use by a chatroom run; export it when the run has "
                "finished"
            ) from None
        yield


def _finished_run(run_dir: Path) -> dict[str, Any]:
    """run.json of a finished run; one clear error for anything else."""
    if not run_dir.is_dir():
        raise InputError(f"{run_dir} is not a folder")
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        raise InputError(f"{run_dir} is not a chatroom run (it has no run.json)")
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{run_json} cannot be read: {exc}") from None
    status = info.get("status") if isinstance(info, dict) else None
    if status not in FINISHED:
        raise InputError(
            f"{run_dir} holds an unfinished run (status: {status}); finish it with "
            "the same `chatroom run` command (without --stop-after), then export"
        )
    if not (run_dir / "metadata.jsonl").is_file():
        raise InputError(f"{run_dir} has no metadata.jsonl")
    return info


def _collect(run_dir: Path) -> tuple[list[Sample], list[dict[str, Any]]]:
    """The records of metadata.jsonl in index order, and those that must be skipped."""
    try:
        rows = store.read_jsonl(run_dir / "metadata.jsonl")
    except (OSError, ValueError) as exc:
        raise InputError(f"metadata.jsonl cannot be read: {exc}") from None

    def position(pair):
        number, row = pair
        index = row.get("index") if isinstance(row, dict) else None
        return (index if isinstance(index, int) else number, number)

    samples: list[Sample] = []
    skipped: list[dict[str, Any]] = []
    keys: set[str] = set()
    for number, row in sorted(enumerate(rows), key=position):
        index = position((number, row))[0]
        sample, reason = _sample(run_dir, row, index)
        if sample is not None and sample.key in keys:
            sample, reason = None, f"item id {sample.row['item_id']!r} is repeated"
        if sample is None:
            item_id = row.get("item_id") if isinstance(row, dict) else None
            skipped.append({"item_id": item_id, "index": index, "reason": reason})
            log.warning("skipped record %s: %s", item_id or index, reason)
            continue
        keys.add(sample.key)
        samples.append(sample)
    return samples, skipped


def _sample(run_dir: Path, row, index: int) -> tuple[Sample | None, str]:
    """A record and its files, or None and why it cannot be exported."""
    if not isinstance(row, dict):
        return None, "the row is not a JSON object"
    item_id, file_name = row.get("item_id"), row.get("file_name")
    if not isinstance(item_id, str) or not item_id:
        return None, "the row has no item_id"
    if not isinstance(file_name, str) or not file_name:
        return None, "the row has no file_name"

    def local(rel: str, what: str) -> tuple[Path | None, str]:
        path = run_dir / rel
        if not path.resolve().is_relative_to(run_dir.resolve()):
            return None, f"{what} {rel} is outside the run folder"
        if not path.is_file():
            return None, f"{what} missing: {rel}"
        return path, ""

    image, reason = local(file_name, "image")
    if image is None:
        return None, reason
    masks = {}
    for part, rel in sorted((row.get("masks") or {}).items()):
        masks[part], reason = local(str(rel), f"mask {part!r}")
        if masks[part] is None:
            return None, reason
    pose = None
    if row.get("pose"):
        pose, reason = local(str(row["pose"]), "pose")
        if pose is None:
            return None, reason
    key = _UNSAFE.sub("_", item_id)
    return Sample(_portable(row), index, key, image, masks, pose), ""


def _portable(row: dict[str, Any]) -> dict[str, Any]:
    """The row as shards carry it: references by file name, not by local directory."""
    sources = row.get("reference_sources")
    if not isinstance(sources, list):
        return row
    row = dict(row)
    row["reference_sources"] = [
        {**s, "path": PurePath(str(s["path"])).name}
        if isinstance(s, dict) and s.get("path")
        else s
        for s in sources
    ]
    return row


def _write_atomically(path: Path, write: Callable[[Path], None]) -> tuple[str, int]:
    """Write a shard under a temporary name, then rename it; its sha256 and size."""
    tmp = path.with_name(store.TMP_PREFIX + path.name)
    try:
        write(tmp)
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
            os.fsync(fh.fileno())
        size = tmp.stat().st_size
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None


# --- Parquet ------------------------------------------------------------------------


class _ParquetShards:
    """Builds one Arrow schema for the whole export, then writes shards with it."""

    def prepare(self, samples: list[Sample]) -> dict[str, Any]:
        import pyarrow as pa

        columns: dict[str, None] = {}
        for sample in samples:
            columns.update(dict.fromkeys(sample.row))
        fields, self.json_columns = [], []
        for name in columns:
            values = [sample.row.get(name) for sample in samples]
            try:
                arrow_type = pa.array(values).type
            except (pa.ArrowException, OverflowError, TypeError, ValueError):
                arrow_type = None
            if arrow_type is None or _has_empty_struct(arrow_type):
                self.json_columns.append(name)
                fields.append(
                    pa.field(
                        name,
                        pa.string(),
                        metadata={b"chatroom.encoding": JSON_ENCODING},
                    )
                )
            else:
                fields.append(pa.field(name, arrow_type))
        fields.append(pa.field(IMAGE_COLUMN, pa.binary()))
        mask = pa.struct([("part", pa.string()), ("png", pa.binary())])
        fields.append(pa.field(MASKS_COLUMN, pa.list_(mask)))
        about = {"json_columns": self.json_columns}
        self.schema = pa.schema(
            fields, metadata={b"chatroom": json.dumps(about).encode()}
        )
        return {"columns": self.schema.names, "json_columns": self.json_columns}

    def write(self, path: Path, samples: list[Sample]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, self.schema) as writer:
            for start in range(0, len(samples), ROW_GROUP_SIZE):
                batch = [self._row(s) for s in samples[start : start + ROW_GROUP_SIZE]]
                writer.write_table(pa.Table.from_pylist(batch, schema=self.schema))

    def _row(self, sample: Sample) -> dict[str, Any]:
        row = dict(sample.row)
        for name in self.json_columns:
            if row.get(name) is not None:
                row[name] = json.dumps(row[name], ensure_ascii=False)
        row[IMAGE_COLUMN] = _read(sample.image)
        row[MASKS_COLUMN] = [
            {"part": part, "png": _read(path)} for part, path in sample.masks.items()
        ]
        return row


def _has_empty_struct(arrow_type) -> bool:
    """Parquet cannot store a struct without fields (a column of empty objects)."""
    import pyarrow as pa

    if pa.types.is_struct(arrow_type):
        if arrow_type.num_fields == 0:
            return True
        return any(
            _has_empty_struct(arrow_type.field(i).type)
            for i in range(arrow_type.num_fields)
        )
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return _has_empty_struct(arrow_type.value_type)
    return False


# --- WebDataset ---------------------------------------------------------------------


class _TarShards:
    """Tar files in the WebDataset layout, byte for byte the same on every export."""

    def prepare(self, samples: list[Sample]) -> dict[str, Any]:
        return {
            "members": {
                "<key>.png": "the image",
                "<key>.json": "the metadata row",
                "<key>.mask.<part>.png": "one per mask",
                "<key>.pose.json": "the pose, when the record has one",
            }
        }

    def write(self, path: Path, samples: list[Sample]) -> None:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for sample in samples:
                for name, data in self._members(sample):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    info.mode = 0o644
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))

    def _members(self, sample: Sample) -> Iterator[tuple[str, bytes]]:
        key = sample.key
        yield f"{key}{sample.image.suffix.lower()}", _read(sample.image)
        yield f"{key}.json", json.dumps(sample.row, ensure_ascii=False).encode()
        for part, path in sample.masks.items():
            part = _UNSAFE.sub("_", part)
            yield f"{key}.mask.{part}{path.suffix.lower()}", _read(path)
        if sample.pose is not None:
            yield f"{key}.pose.json", _read(sample.pose)
