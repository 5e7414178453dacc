"""The output folder: atomic file writes and the dataset layout."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
DATA_DIRS = ("images", "masks", "poses")
REPORT_DIR = "report"
# The files a run writes at the top of its folder (besides the lock).
RUN_FILES = (
    "run.json",
    "journal.sqlite",
    "journal.sqlite-wal",
    "journal.sqlite-shm",
    "attributes.jsonl",
    "prompts.jsonl",
    "metadata.jsonl",
    "rejected.jsonl",
    "failures.jsonl",
)

# How a run names what it writes under its folder: item ids are 16 hex digits, and a
# write killed half-way leaves a temporary file beside its target.
_ITEM = r"[0-9a-f]{16}"
_TMP = re.escape(TMP_PREFIX) + r"[^/]*"
_DATA_FILE = re.compile(
    rf"images/(?:{_ITEM}\.png|{_TMP})"
    rf"|masks/{_ITEM}/(?:[^/]+\.png|{_TMP})"
    rf"|poses/(?:{_ITEM}\.json|{_TMP})"
)
_DATA_DIR = re.compile(rf"(?:images|masks|poses|masks/{_ITEM})")
# `chatroom report` writes pages, its summary, its VLM answers and thumbnails.
_REPORT_FILE = re.compile(
    rf"{REPORT_DIR}/(?:index\.html|page-\d+\.html|summary\.json|vlm-answers\.jsonl"
    r"|thumbs/[^/]+\.jpg)"
)
_REPORT_DIR = re.compile(rf"{REPORT_DIR}(?:/thumbs)?")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file so that it is either absent or complete, even after SIGKILL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; match open()'s files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; raises ValueError naming the file and line."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON: {exc.msg}") from None
    return rows


def save_image(path: str | Path, image) -> None:
    """Save a PIL image as PNG, atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def is_data_file(rel: str) -> bool:
    """Whether a path under the run folder is named as a run names its data files."""
    return _DATA_FILE.fullmatch(rel) is not None


def _is_run_file(rel: str) -> bool:
    top = "/" not in rel
    if top:
        return rel in RUN_FILES or rel == LOCK_FILE or rel.startswith(TMP_PREFIX)
    return is_data_file(rel) or _REPORT_FILE.fullmatch(rel) is not None


def _is_run_dir(rel: str) -> bool:
    return (
        _DATA_DIR.fullmatch(rel) is not None or _REPORT_DIR.fullmatch(rel) is not None
    )


def _walk(out: Path, under: str = "") -> Iterator[tuple[str, bool]]:
    """(relative path, is a folder) for everything under ``out/under``, depth first.

    Symbolic links are listed as files and never followed.
    """
    with os.scandir(out / under) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        rel = f"{under}/{entry.name}" if under else entry.name
        is_dir = entry.is_dir(follow_symlinks=False)
        yield rel, is_dir
        if is_dir:
            yield from _walk(out, rel)


def foreign_files(out: Path) -> Iterator[str]:
    """Paths under a run folder that no run wrote (files, and empty folders), in order.

    A run's own files are those at the names it gives them (see ``RUN_FILES``, the
    data folders' item-id names and the report's pages); anything else is someone
    else's, and a run must not delete it.
    """
    for rel, is_dir in _walk(out):
        if is_dir:
            if not _is_run_dir(rel) and not any(Path(out, rel).iterdir()):
                yield rel  # an empty folder someone made
        elif not _is_run_file(rel):
            yield rel


def wipe_run(out: Path) -> None:
    """Delete every file a run wrote in ``out`` and its emptied folders, nothing else."""
    paths = list(_walk(out))
    for rel, is_dir in paths:
        if not is_dir and _is_run_file(rel) and rel != LOCK_FILE:
            Path(out, rel).unlink()
    _remove_empty_run_dirs(out, [rel for rel, is_dir in paths if is_dir])


def _remove_empty_run_dirs(out: Path, folders: list[str]) -> None:
    for rel in sorted(folders, reverse=True):  # children before their parents
        path = Path(out, rel)
        if _is_run_dir(rel) and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def remove_orphans(out: Path, keep: set[str]) -> list[str]:
    """Delete data files a killed write left, keeping every other file.

    A file goes only when it is named as a run names its data files and no written
    record owns it; files of other names are someone else's.
    """
    removed = []
    folders = []
    for name in DATA_DIRS:
        folder = out / name
        if folder.is_symlink() or not folder.is_dir():
            continue
        for rel, is_dir in _walk(out, name):
            if is_dir:
                folders.append(rel)
            elif rel not in keep and is_data_file(rel):
                (out / rel).unlink()
                removed.append(rel)
    _remove_empty_run_dirs(out, folders)
    for path in out.glob(TMP_PREFIX + "*"):
        path.unlink()
        removed.append(path.name)
    return removed


class FolderLock:
    """An exclusive lock on a run folder; the OS releases it if the run dies."""

    def __init__(self, out: Path):
        import fcntl

        from .errors import ResumeError

        path = out / LOCK_FILE
        self.path = path
        self.created = not path.exists()  # a refused run removes the lock it made
        self._handle = open(path, "a+")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.seek(0)
            holder = self._handle.read().strip() or "another process"
            self._handle.close()
            raise ResumeError(
                f"{out} is in use by another chatroom run ({holder}); wait for it to "
                "finish or choose another -o"
            ) from None
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(f"pid {os.getpid()}")
        self._handle.flush()

    def close(self, remove: bool = False) -> None:
        """Release the lock; ``remove`` also deletes the lock file while still held."""
        if self._handle.closed:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        self._handle.close()


def lock_folder(out: Path) -> FolderLock:
    """Hold an exclusive lock on a run folder until ``close()``."""
    return FolderLock(out)
