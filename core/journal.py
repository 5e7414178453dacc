"""The run journal: an SQLite file in the run folder, the source of truth on resume."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    idx INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    record TEXT,
    reason TEXT,
    files TEXT,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL UNIQUE
);
"""

# Final states: an item in one of them is never processed again.
WRITTEN, REJECTED, FAILED, SURPLUS = "written", "rejected", "failed", "surplus"
DONE = (WRITTEN, REJECTED, FAILED)


class Journal:
    """Thread-safe access to the journal; every write is its own transaction."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- meta --------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM meta WHERE key=?", (key,)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value))
            )

    # --- items -------------------------------------------------------------------

    def finish(
        self,
        index: int,
        item_id: str,
        status: str,
        record: dict | None = None,
        reason: str = "",
        files: list[str] | None = None,
    ) -> None:
        """Mark an item final. Its files must already be in place."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    index,
                    item_id,
                    status,
                    json.dumps(record) if record is not None else None,
                    reason,
                    json.dumps(files or []),
                    time.time(),
                ),
            )

    def statuses(self) -> dict[int, str]:
        with self._lock:
            rows = self._db.execute("SELECT idx, status FROM items").fetchall()
        return dict(rows)

    def count(self, status: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM items WHERE status=?", (status,)
            ).fetchone()
        return row[0]

    def records(self, status: str = WRITTEN) -> list[dict]:
        with self._lock:
            rows = self._db.execute(
                "SELECT record FROM items WHERE status=? ORDER BY idx", (status,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows if r[0]]

    def files(self) -> set[str]:
        """Every file that belongs to a written record (relative paths)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT files FROM items WHERE status=?", (WRITTEN,)
            ).fetchall()
        return {f for (files,) in rows for f in json.loads(files or "[]")}

    def written_files(self) -> list[tuple[int, str, list[str]]]:
        """(index, item id, files) of every written record, in index order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT idx, item_id, files FROM items WHERE status=? ORDER BY idx",
                (WRITTEN,),
            ).fetchall()
        return [(idx, item, json.loads(files or "[]")) for idx, item, files in rows]

    def reopen(self, index: int) -> None:
        """Forget an item's outcome so that the run processes it again."""
        with self._lock:
            self._db.execute("DELETE FROM items WHERE idx=?", (index,))

    # --- failures and cache ------------------------------------------------------

    def add_failure(self, body: dict) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO failures (body) VALUES (?)",
                (json.dumps(body, sort_keys=True),),
            )

    def failures(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM failures ORDER BY id").fetchall()
        return [json.loads(r[0]) for r in rows]

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM cache WHERE key=?", (key,)
            ).fetchone()
        return row[0] if row else None

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO cache VALUES (?, ?)", (key, value))
