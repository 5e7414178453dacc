"""civitai:<id> downloads against a fake Civitai on 127.0.0.1, and Hub ids offline."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from chatroom.components import Context, validate_options
from chatroom.errors import ChatroomError, ConfigError
from chatroom.plugins.civitai import Civitai, parse_ref

VERSION = 4242
TOKEN = "civitai-secret-token-0123456789"


class FakeCivitai:
    """The two Civitai endpoints a download needs, with Range and fault switches.

    ``drop_once``: the next file request sends half its bytes, then the connection
    is cut. ``wrong_hash``: the API lists another SHA-256. ``require_token``: the
    file answers 401 without ``Authorization: Bearer <token>``. ``redirect``: the
    download URL redirects to a storage URL, which serves the bytes.
    """

    def __init__(self, payload: bytes, name: str = "model.safetensors"):
        self.payload = payload
        self.name = name
        self.drop_once = False
        self.wrong_hash = False
        self.require_token = ""
        self.redirect = False
        self.requests: list[tuple[str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake.requests.append((self.path, dict(self.headers)))
                if self.path == f"/api/v1/model-versions/{VERSION}":
                    return self._send(200, json.dumps(fake.version()).encode())
                if self.path == f"/api/download/models/{VERSION}":
                    if fake.redirect:  # as Civitai sends downloads to its storage
                        location = f"{fake.base_url}/storage/{VERSION}"
                        return self._send(307, b"", {"Location": location})
                    return fake.serve_file(self)
                if self.path == f"/storage/{VERSION}":
                    return fake.serve_file(self)
                self._send(404, b"{}")

            def _send(self, status, body, headers=None):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), daemon=True
        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def version(self) -> dict:
        digest = hashlib.sha256(self.payload).hexdigest().upper()
        if self.wrong_hash:
            digest = "0" * 64
        return {
            "id": VERSION,
            "files": [
                {
                    "name": "model.ckpt",
                    "sizeKB": len(self.payload) / 1024,
                    "hashes": {"SHA256": "1" * 64},
                    "downloadUrl": f"{self.base_url}/api/download/models/1",
                    "primary": False,
                    "metadata": {"format": "PickleTensor"},
                },
                {
                    "name": self.name,
                    "sizeKB": len(self.payload) / 1024,
                    "hashes": {"SHA256": digest},
                    "downloadUrl": f"{self.base_url}/api/download/models/{VERSION}",
                    "primary": True,
                    "metadata": {"format": "SafeTensor"},
                },
            ],
        }

    def serve_file(self, handler: BaseHTTPRequestHandler) -> None:
        auth = handler.headers.get("Authorization", "")
        if self.require_token and auth != f"Bearer {self.require_token}":
            return handler._send(401, b'{"error": "Unauthorized"}')
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", handler.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
        body = self.payload[start:]
        handler.send_response(206 if match else 200)
        handler.send_header("Content-Length", str(len(body)))
        if match:
            total = len(self.payload)
            handler.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        handler.end_headers()
        if self.drop_once:
            self.drop_once = False
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return
        handler.wfile.write(body)

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture
def payload() -> bytes:
    return bytes(range(256)) * 1600  # 400 KiB, not a whole number of KB steps


@pytest.fixture
def fake(payload):
    with FakeCivitai(payload) as server:
        yield server


def downloader(fake: FakeCivitai, tmp_path: Path, **kw) -> Civitai:
    return Civitai(
        cache_dir=str(tmp_path / "cache"), base_url=fake.base_url, backoff=0, **kw
    )


def test_parse_ref():
    assert parse_ref("civitai:128713") == 128713
    assert parse_ref("models/sd15.safetensors") is None
    with pytest.raises(ConfigError, match="civitai:<modelVersionId>"):
        parse_ref("civitai:abc")


def test_download_picks_the_primary_safetensor_and_verifies(fake, payload, tmp_path):
    path = downloader(fake, tmp_path).fetch(VERSION)

    assert path == tmp_path / "cache" / str(VERSION) / "model.safetensors"
    assert path.read_bytes() == payload
    assert not list(path.parent.glob("*.part"))
    assert fake.paths() == [
        f"/api/v1/model-versions/{VERSION}",
        f"/api/download/models/{VERSION}",
    ]


def test_broken_download_resumes_with_one_range_request(fake, payload, tmp_path):
    fake.drop_once = True
    path = downloader(fake, tmp_path).fetch(VERSION)

    assert path.read_bytes() == payload
    ranges = [h.get("Range") for p, h in fake.requests if "download" in p]
    assert ranges[0] is None and len(ranges) == 2
    assert ranges[1] == f"bytes={len(payload) // 2}-"


def test_partial_file_from_an_earlier_run_is_resumed(fake, payload, tmp_path):
    folder = tmp_path / "cache" / str(VERSION)
    folder.mkdir(parents=True)
    (folder / "model.safetensors.part").write_bytes(payload[:1000])

    path = downloader(fake, tmp_path).fetch(VERSION)

    assert path.read_bytes() == payload
    ranges = [h.get("Range") for p, h in fake.requests if "download" in p]
    assert ranges == ["bytes=1000-"]


def test_hash_mismatch_raises_and_leaves_no_file(fake, tmp_path):
    fake.wrong_hash = True
    with pytest.raises(ChatroomError, match="SHA-256.*deleted"):
        downloader(fake, tmp_path).fetch(VERSION)

    folder = tmp_path / "cache" / str(VERSION)
    assert not list(folder.glob("*.safetensors*"))


def test_token_is_sent_as_bearer_and_never_logged_or_stored(
    fake, payload, tmp_path, monkeypatch, caplog
):
    fake.require_token = TOKEN
    fake.drop_once = True  # a retry is logged too
    caplog.set_level(logging.DEBUG)

    monkeypatch.delenv("CIVITAI_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"needs a Civitai API key.*\$CIVITAI_TOKEN"):
        downloader(fake, tmp_path).fetch(VERSION)

    monkeypatch.setenv("CIVITAI_TOKEN", "wrong-token")
    with pytest.raises(ConfigError, match="rejected the token") as rejected:
        downloader(fake, tmp_path).fetch(VERSION)
    assert "wrong-token" not in str(rejected.value)

    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    path = downloader(fake, tmp_path).fetch(VERSION)

    assert path.read_bytes() == payload
    auths = [h.get("Authorization") for p, h in fake.requests if "download" in p]
    assert auths[-1] == f"Bearer {TOKEN}"
    assert "retry" in caplog.text
    assert TOKEN not in caplog.text
    for file in (tmp_path / "cache").rglob("*"):
        if file.is_file():
            assert TOKEN.encode() not in file.read_bytes()


def test_token_does_not_follow_a_redirect_but_range_does(
    fake, payload, tmp_path, monkeypatch
):
    fake.redirect = True
    fake.drop_once = True
    monkeypatch.setenv("CIVITAI_TOKEN", TOKEN)
    path = downloader(fake, tmp_path).fetch(VERSION)

    assert path.read_bytes() == payload
    storage = [h for p, h in fake.requests if p.startswith("/storage/")]
    assert [h.get("Range") for h in storage] == [None, f"bytes={len(payload) // 2}-"]
    assert all("Authorization" not in h for h in storage)


def test_cached_file_is_reused_without_a_request(fake, payload, tmp_path):
    first = downloader(fake, tmp_path).fetch(VERSION)
    fake.requests.clear()

    # Not even the base URL is asked: an unreachable one does not matter.
    again = Civitai(cache_dir=str(tmp_path / "cache"), base_url="http://127.0.0.1:9")
    assert again.fetch(VERSION) == first
    assert fake.requests == []


def test_public_base_url_is_refused_under_tests(tmp_path):
    with pytest.raises(ConfigError, match="refusing to call civitai.com"):
        Civitai(cache_dir=str(tmp_path)).fetch(VERSION)


def test_download_url_on_a_public_host_is_refused(fake, tmp_path, monkeypatch):
    version = fake.version()
    version["files"][1]["downloadUrl"] = "https://civitai.com/api/download/models/1"
    monkeypatch.setattr(FakeCivitai, "version", lambda self: version)
    with pytest.raises(ConfigError, match="refusing to call civitai.com"):
        downloader(fake, tmp_path).fetch(VERSION)


# --- through the diffusers generator -------------------------------------------------

pytest.importorskip("diffusers")

from chatroom.plugins.diffusers_generator import (  # noqa: E402
    DiffusersGenerator,
    resolve_model,
)


def options(**raw):
    return validate_options(DiffusersGenerator, "generator", raw)


def test_generator_resolves_civitai_to_the_cached_file(fake, payload, tmp_path):
    opts = options(
        model=f"civitai:{VERSION}",
        civitai_cache_dir=str(tmp_path / "cache"),
        civitai_base_url=fake.base_url,
    )
    path = resolve_model(opts)

    assert path == tmp_path / "cache" / str(VERSION) / "model.safetensors"
    assert path.read_bytes() == payload
    assert resolve_model(opts) == path  # cached


def test_generator_keeps_local_paths(tmp_path):
    assert resolve_model(options(model=str(tmp_path))) == tmp_path
    missing = "models/none.safetensors"
    assert resolve_model(options(model=missing)) == Path(missing)


def test_hub_id_offline_fails_fast_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for local_only in (True, False):
        opts = options(
            model="chatroom-tests/no-such-model", local_files_only=local_only
        )
        with pytest.raises(ConfigError) as failed:
            resolve_model(opts)
        message = str(failed.value)
        assert "\n" not in message
        assert "no local path and not in the Hugging Face cache" in message
        assert "local diffusers folder" in message


def test_civitai_smoke_checkpoint_loads_through_the_generator(smoke_dir, tmp_path):
    checkpoint = (smoke_dir / "sd15.safetensors").read_bytes()
    with FakeCivitai(checkpoint, name="smoke_sd15.safetensors") as server:
        raw = {
            "model": f"civitai:{VERSION}",
            "config": str(smoke_dir / "sd15"),
            "civitai_cache_dir": str(tmp_path / "cache"),
            "civitai_base_url": server.base_url,
            "device": "cpu",
            "dtype": "float32",
        }
        generator = DiffusersGenerator(options(**raw), Context(domain=None))
        pipe = generator.load()
    assert pipe.unet is not None
    assert (tmp_path / "cache" / str(VERSION) / "smoke_sd15.safetensors").is_file()
    # run.json hashes the downloaded file, not the civitai: reference
    described = generator.describe()
    assert described["sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert described["path"].endswith("smoke_sd15.safetensors")
    generator.close()
