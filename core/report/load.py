"""Reading a run folder into plain dictionaries, tolerating missing or partial files."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ChatroomError

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a missing file is empty and a torn last line is skipped."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: not JSON, skipped", path, number)
    return rows


@dataclass
class RunData:
    """What a report needs from one run folder."""

    out: Path
    info: dict[str, Any]
    records: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    attributes: list[dict[str, Any]]
    prompts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        return self.info.get("summary") or {}

    @property
    def references(self) -> list[dict[str, Any]]:
        return (self.info.get("references") or {}).get("images") or []

    @property
    def name(self) -> str:
        return self.out.resolve().name

    def settings(self) -> dict[str, Any]:
        """Resolved settings as {key: value}."""
        raw = self.info.get("settings") or {}
        return {
            key: (item.get("value") if isinstance(item, dict) else item)
            for key, item in raw.items()
        }


def _in_use(out: Path) -> bool:
    """Whether a live run holds the folder's lock (a killed run's lock is released)."""
    import fcntl

    try:
        handle = open(out / ".lock")  # noqa: SIM115 - closed below
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def load_run(out: str | Path) -> RunData:
    out = Path(out)
    run_json = out / "run.json"
    if not run_json.is_file():
        raise ChatroomError(f"{out}: not a run folder (no run.json)")
    try:
        info = json.loads(run_json.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ChatroomError(f"{run_json}: cannot parse: {exc}") from None
    shapes = {"settings": dict, "summary": (dict, type(None)), "components": dict}
    if not isinstance(info, dict) or any(
        not isinstance(info.get(key, {}), kind) for key, kind in shapes.items()
    ):
        raise ChatroomError(f"{run_json}: not a chatroom run.json")
    if info.get("status") == "running" and not _in_use(out):
        info["status"] = "interrupted (run the same command to resume)"
    return RunData(
        out=out,
        info=info,
        records=read_jsonl(out / "metadata.jsonl"),
        rejected=read_jsonl(out / "rejected.jsonl"),
        failures=read_jsonl(out / "failures.jsonl"),
        attributes=read_jsonl(out / "attributes.jsonl"),
        prompts=read_jsonl(out / "prompts.jsonl"),
    )
