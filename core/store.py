"""The output folder: atomic file writes and the dataset layout."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
DATA_DIRS = ("images", "masks", "poses")


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


def remove_orphans(out: Path, keep: set[str]) -> list[str]:
    """Delete files under the data folders that no written record owns."""
    removed = []
    for name in DATA_DIRS:
        folder = out / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            rel = path.relative_to(out).as_posix()
            if rel not in keep:
                path.unlink()
                removed.append(rel)
        for sub in sorted(folder.rglob("*"), reverse=True):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
    for path in out.glob(TMP_PREFIX + "*"):
        path.unlink()
        removed.append(path.name)
    return removed


def lock_folder(out: Path):
    """Hold an exclusive lock on a run folder; the OS releases it if the run dies."""
    import fcntl

    from .errors import ResumeError

    handle = open(out / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ResumeError(
            f"{out} is in use by another chatroom run ({holder}); wait for it to "
            "finish or choose another -o"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle
