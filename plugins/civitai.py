"""Fetch ``civitai:<modelVersionId>`` checkpoints into a local cache.

The Civitai API lists a model version's files; the primary SafeTensor file is
downloaded to ``<cache_dir>/<version id>/<name>.part``, resumed with an HTTP Range
request after a broken connection, checked against the listed size and SHA-256, and
only then renamed to its final name. A file under its final name was verified, so
it is reused without asking the server again.

The API token is read from an environment variable and sent as a Bearer header to
the Civitai server only (not to the storage host a download redirects to); it is
never logged, written or put in a message. Only the standard library is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from chatroom.errors import ChatroomError, ConfigError

from .remote import check_base_url, safe_url, scrub

log = logging.getLogger(__name__)

PREFIX = "civitai:"
BASE_URL = "https://civitai.com"
TOKEN_ENV = "CIVITAI_TOKEN"
DEFAULT_CACHE = "~/.cache/chatroom/civitai"
META = "civitai.json"  # the version's file entry, beside the download
CHUNK = 1 << 20
WHO = "civitai"


class DownloadError(ChatroomError):
    """A Civitai download failed or did not verify."""


class _Retry(Exception):
    """A transient failure: the connection broke, timed out or the server was busy."""


@dataclass
class CivitaiFile:
    """One file of a model version, as the API lists it."""

    name: str
    size: int  # bytes, from sizeKB
    sha256: str  # lower-case hex; empty when the API lists none
    url: str


def parse_ref(model: str) -> int | None:
    """The version id of ``civitai:<id>``; None for anything else."""
    if not model.lower().startswith(PREFIX):
        return None
    text = model[len(PREFIX) :].strip()
    if not re.fullmatch(r"\d+", text):
        raise ConfigError(
            f"{WHO}: {model!r} is not a Civitai model reference; write "
            "civitai:<modelVersionId>, e.g. civitai:128713"
        )
    return int(text)


@dataclass
class Civitai:
    """A downloader for one Civitai server."""

    cache_dir: str = DEFAULT_CACHE
    base_url: str = BASE_URL
    token_env: str = TOKEN_ENV
    timeout: float = 30.0  # seconds to connect, and between bytes
    retries: int = 4
    backoff: float = 1.0  # first wait between tries, doubled each time

    def fetch(self, version_id: int) -> Path:
        """The verified local file of a model version, downloaded when needed."""
        folder = Path(self.cache_dir).expanduser() / str(version_id)
        cached = self._cached(folder)
        if cached is not None:
            log.debug("civitai:%d is cached at %s", version_id, cached)
            return cached

        check_base_url(self.base_url, WHO)
        entry = self.version_file(version_id)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"name": entry.name, "size": entry.size, "sha256": entry.sha256}
        _write_atomic(folder / META, json.dumps(meta, indent=2) + "\n")
        target = folder / entry.name
        part = target.with_name(target.name + ".part")
        self._download(entry, part)
        self._verify(entry, part)
        os.replace(part, target)
        log.info("civitai:%d saved to %s", version_id, target)
        return target

    # --- the API -----------------------------------------------------------------

    def version_file(self, version_id: int) -> CivitaiFile:
        """The primary SafeTensor file of a model version."""
        url = f"{self.base_url.rstrip('/')}/api/v1/model-versions/{version_id}"
        with self._open(url, what=f"civitai:{version_id}") as reply:
            try:
                data = json.loads(reply.read())
            except ValueError:
                raise DownloadError(
                    f"{WHO}: {safe_url(url)} did not answer with JSON"
                ) from None
        files = data.get("files") if isinstance(data, dict) else None
        safetensors = [
            f
            for f in files or []
            if isinstance(f, dict)
            and str((f.get("metadata") or {}).get("format", "")).lower() == "safetensor"
        ]
        if not safetensors:
            formats = sorted(
                {str((f.get("metadata") or {}).get("format")) for f in files or []}
            )
            raise ConfigError(
                f"{WHO}: model version {version_id} has no SafeTensor file (formats: "
                f"{', '.join(formats) or 'none'}); pickled checkpoints are not "
                "downloaded"
            )
        chosen = next((f for f in safetensors if f.get("primary")), safetensors[0])
        name = Path(str(chosen.get("name") or "")).name
        if name in ("", ".", "..") or not chosen.get("downloadUrl"):
            raise DownloadError(
                f"{WHO}: model version {version_id} lists no file name or download URL"
            )
        if not name.lower().endswith(".safetensors"):
            name += ".safetensors"
        check_base_url(str(chosen["downloadUrl"]), WHO)
        return CivitaiFile(
            name=name,
            size=round(float(chosen.get("sizeKB") or 0) * 1024),
            sha256=str((chosen.get("hashes") or {}).get("SHA256") or "").lower(),
            url=str(chosen["downloadUrl"]),
        )

    # --- download ------------------------------------------------------------------

    def _cached(self, folder: Path) -> Path | None:
        """The verified file in ``folder``: renamed only after it was checked."""
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
            target = folder / Path(meta["name"]).name
            if target.is_file() and _size_ok(target.stat().st_size, meta["size"]):
                return target
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def _download(self, entry: CivitaiFile, part: Path) -> None:
        """Fill ``part`` with the file, resuming after broken connections."""
        wait = self.backoff
        for attempt in range(self.retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if entry.size and have >= entry.size:
                return
            try:
                self._get(entry, part, have)
                return
            except _Retry as exc:
                if attempt == self.retries:
                    raise DownloadError(
                        f"{WHO}: downloading {entry.name} failed after "
                        f"{self.retries} retries ({exc}); run again to resume"
                    ) from None
                log.info(
                    "%s: %s at %d bytes of %s, retry %d of %d",
                    WHO,
                    exc,
                    part.stat().st_size if part.exists() else 0,
                    entry.name,
                    attempt + 1,
                    self.retries,
                )
                time.sleep(wait)
                wait *= 2

    def _get(self, entry: CivitaiFile, part: Path, have: int) -> None:
        headers = {"Range": f"bytes={have}-"} if have else {}
        with self._open(entry.url, what=entry.name, headers=headers) as reply:
            resumed = have and reply.status == 206
            mode = "ab" if resumed else "wb"  # a 200 sends the whole file again
            try:
                with part.open(mode) as out:
                    while chunk := reply.read(CHUNK):
                        out.write(chunk)
            except (OSError, HTTPException) as exc:
                raise _Retry(type(exc).__name__) from None
            expected = reply.headers.get("Content-Length")
        got = part.stat().st_size - (have if resumed else 0)
        if expected is not None and got < int(expected):
            raise _Retry(f"connection closed after {got} of {expected} bytes")

    def _verify(self, entry: CivitaiFile, part: Path) -> None:
        """Size and SHA-256 against the API's; a mismatch deletes the file."""
        size = part.stat().st_size
        if entry.size and not _size_ok(size, entry.size):
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{WHO}: {entry.name} has {size} bytes but Civitai lists "
                f"{entry.size}; the download was deleted, run again"
            )
        if not entry.sha256:
            log.warning(
                "%s: %s has no SHA-256 listed; size checked only", WHO, entry.name
            )
            return
        digest = hashlib.sha256()
        with part.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != entry.sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"{WHO}: {entry.name} does not match the SHA-256 Civitai lists "
                f"({entry.sha256[:12]}..., got {digest.hexdigest()[:12]}...); the "
                "download was deleted"
            )

    # --- HTTP ----------------------------------------------------------------------

    def _open(self, url: str, *, what: str, headers: dict[str, str] | None = None):
        """A response for a GET, with the token; HTTP errors become clear errors."""
        token = os.environ.get(self.token_env, "")
        request = urllib.request.Request(url, headers=headers or {})
        if token:
            # Unredirected: the storage host a download redirects to never sees it.
            request.add_unredirected_header("Authorization", f"Bearer {token}")
        wait = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return urllib.request.urlopen(request, timeout=self.timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                if exc.code in (401, 403):
                    raise ConfigError(
                        self._auth_message(what, exc.code, token)
                    ) from None
                if exc.code == 404:
                    raise ConfigError(f"{WHO}: {what} was not found (404)") from None
                if exc.code not in (408, 429) and exc.code < 500:
                    raise DownloadError(
                        f"{WHO}: the server refused {what} ({exc.code})"
                    ) from None
                reason: Any = exc.code
            except (urllib.error.URLError, OSError, HTTPException) as exc:
                reason = scrub(str(getattr(exc, "reason", exc)), token)
            if attempt == self.retries:
                raise DownloadError(
                    f"{WHO}: {what}: {reason}, after {self.retries} retries"
                )
            log.info("%s: %s: %s, retry %d", WHO, what, reason, attempt + 1)
            time.sleep(wait)
            wait *= 2
        raise AssertionError("unreachable")

    def _auth_message(self, what: str, status: int, token: str) -> str:
        if token:
            return (
                f"{WHO}: the server rejected the token in ${self.token_env} for "
                f"{what} ({status}); check that variable"
            )
        return (
            f"{WHO}: {what} needs a Civitai API key ({status}); put one in "
            f"${self.token_env}"
        )


def _size_ok(actual: int, listed: int) -> bool:
    """sizeKB is rounded by the API: allow under one KB of difference."""
    return abs(actual - listed) < 1024


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
