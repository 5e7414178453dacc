"""A fake Hugging Face Hub on 127.0.0.1: the HTTP API that ``huggingface_hub`` uses
to create a dataset repo and commit files to it, and nothing else.

Endpoints, as ``huggingface_hub`` 2.x calls them:

- ``GET /api/whoami-v2``: who the bearer token belongs to;
- ``POST /api/repos/create``: a new repo (409 when it exists);
- ``GET /api/datasets/<repo>[/revision/<rev>]`` and ``GET .../tree/<rev>``: repo
  info and its file list;
- ``POST /api/datasets/<repo>/branch/<name>``: a new branch from ``main``;
- ``POST /api/validate-yaml``: checks a README's metadata header;
- ``POST /api/datasets/<repo>/preupload/<rev>``: "lfs" or "regular" per file, and the
  oid of the file already there;
- ``POST /datasets/<repo>.git/info/lfs/objects/batch``: the git-LFS batch API with the
  basic transfer (an upload href per object not yet stored, and a verify href);
- ``PUT /lfs-storage/<oid>`` (the "S3" of the basic transfer) and the verify call;
- ``POST /api/datasets/<repo>/commit/<rev>``: the NDJSON commit (header, file,
  lfsFile, deletedFile, deletedFolder lines).

Xet storage is not offered: the server sends no Xet headers and refuses the Xet
token route. ``huggingface_hub`` decides to use Xet from ``hf_xet`` being installed,
not from the server, so clients of this fake set ``HF_HUB_DISABLE_XET=1``.

Switches for tests::

    with FakeHubServer(tokens={"hf_abc": "alice"}, orgs={"alice": ["lab"]}) as hub:
        hub.faults.append(("commit", 503))   # the next commit gets a 503
        hub.hold_uploads_after = 1           # LFS PUTs after the first one hang
        hub.files("lab/shirts")              # {path: bytes} at the head of main
        hub.uploads                          # Counter of completed LFS PUTs by oid
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_PATTERNS = (".parquet", ".tar", ".png", ".jpg", ".jpeg", ".arrow")
GITATTRIBUTES = "".join(
    f"*{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in LFS_PATTERNS
).encode()
REGULAR_LIMIT = 10 * 1024 * 1024
# A few licence ids of the Hub's list (hf.co/docs/hub/repositories-licenses).
LICENSES = {
    "apache-2.0",
    "mit",
    "cc0-1.0",
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0",
    "openrail",
    "creativeml-openrail-m",
    "other",
    "unknown",
}
SIZE_CATEGORIES = {
    "n<1K",
    "1K<n<10K",
    "10K<n<100K",
    "100K<n<1M",
    "1M<n<10M",
    "10M<n<100M",
    "100M<n<1B",
    "other",
}
REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", "whoami", r"/api/whoami-v2"),
    ("POST", "create", r"/api/repos/create"),
    ("POST", "validate", r"/api/validate-yaml"),
    ("GET", "xet_token", rf"/api/datasets/{REPO}/xet-write-token/(?P<rev>.+)"),
    ("GET", "tree", rf"/api/datasets/{REPO}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?"),
    ("GET", "info", rf"/api/datasets/{REPO}/revision/(?P<rev>.+)"),
    ("GET", "info", rf"/api/datasets/{REPO}"),
    ("POST", "branch", rf"/api/datasets/{REPO}/branch/(?P<rev>.+)"),
    ("POST", "preupload", rf"/api/datasets/{REPO}/preupload/(?P<rev>.+)"),
    ("POST", "commit", rf"/api/datasets/{REPO}/commit/(?P<rev>.+)"),
    ("POST", "lfs_batch", rf"/datasets/{REPO}\.git/info/lfs/objects/batch"),
    ("POST", "lfs_verify", rf"/datasets/{REPO}\.git/info/lfs/objects/verify"),
    ("PUT", "lfs_upload", r"/lfs-storage/(?P<oid>[0-9a-f]{64})"),
]


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    # branch -> list of commits; a commit is (oid, {path: (bytes, is_lfs)})
    branches: dict[str, list[tuple[str, dict[str, tuple[bytes, bool]]]]] = field(
        default_factory=dict
    )

    def head(self, rev: str) -> tuple[str, dict[str, tuple[bytes, bool]]] | None:
        commits = self.branches.get(rev)
        return commits[-1] if commits else None


class Failure(Exception):
    def __init__(self, status: int, error: str, code: str = "", **extra):
        super().__init__(error)
        self.status, self.error, self.code, self.extra = status, error, code, extra


class FakeHubServer:
    def __init__(
        self,
        tokens: dict[str, str] | None = None,
        orgs: dict[str, list[str]] | None = None,
    ):
        self.tokens = dict(tokens or {})
        self.orgs = dict(orgs or {})
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.uploads: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []  # (route, path) of every request
        self.bodies: list[bytes] = []  # every request body, to look for leaks
        self.faults: list[tuple[str, int]] = []  # (route, status), used once each
        self.hold_uploads_after: int | None = None
        self.holding = threading.Event()  # set while an upload is held
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._commits = 0
        self.httpd: ThreadingHTTPServer | None = None
        self.url = ""

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> FakeHubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self) -> FakeHubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what tests look at ----------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        head = self.repos[repo_id].head(revision)
        return {path: data for path, (data, _) in (head[1] if head else {}).items()}

    def commits(self, repo_id: str, revision: str = "main") -> int:
        return len(self.repos[repo_id].branches.get(revision, []))

    def routes(self) -> list[str]:
        return [route for route, _ in self.requests]

    # --- the API ---------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict, headers, body: bytes):
        """(status, json-able body, extra headers) for one request."""
        matches = (
            (route, re.fullmatch(pattern, path))
            for verb, route, pattern in ROUTES
            if verb == method
        )
        route, match = next(((r, m) for r, m in matches if m), (None, None))
        if match is None:
            raise Failure(404, f"no route {method} {path}")
        args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
        with self._lock:
            self.requests.append((route, path))
            self.bodies.append(body)
            for number, (name, status) in enumerate(self.faults):
                if name == route:
                    del self.faults[number]
                    raise Failure(status, f"injected fault: {status}")
        user = None
        if route != "lfs_upload":
            user = self._user(headers)
        if route not in ("lfs_upload", "validate", "whoami") and user is None:
            raise Failure(401, "Invalid credentials in Authorization header")
        return getattr(self, f"_{route}")(user=user, body=body, query=query, **args)

    def _user(self, headers) -> str | None:
        auth = headers.get("Authorization") or ""
        if not auth.startswith("Bearer "):
            return None
        return self.tokens.get(auth[len("Bearer ") :])

    def _may_write(self, user: str, repo_id: str) -> None:
        namespace = repo_id.split("/", 1)[0]
        if namespace != user and namespace not in self.orgs.get(user, []):
            raise Failure(
                403,
                f"You don't have the rights to write to the namespace {namespace!r}",
            )

    def _repo(self, repo_id: str, user: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._readable(user, repo_id)):
            raise Failure(404, "Repository not found", "RepoNotFound")
        return repo

    def _readable(self, user: str, repo_id: str) -> bool:
        namespace = repo_id.split("/", 1)[0]
        return namespace == user or namespace in self.orgs.get(user, [])

    def _head(self, repo: Repo, rev: str):
        head = repo.head(rev)
        if head is None:
            raise Failure(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return head

    def _whoami(self, user, **_):
        if user is None:
            raise Failure(401, "Invalid credentials in Authorization header")
        orgs = [{"name": org, "type": "org"} for org in self.orgs.get(user, [])]
        return 200, {"type": "user", "name": user, "orgs": orgs}, {}

    def _create(self, user, body, **_):
        payload = json.loads(body)
        if payload.get("type") != "dataset":
            raise Failure(400, "this fake makes dataset repos only")
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        self._may_write(user, repo_id)
        url = f"{self.url}/datasets/{repo_id}"
        with self._lock:
            if repo_id in self.repos:
                raise Failure(409, "You already created this dataset repo", url=url)
            repo = Repo(private=payload.get("visibility") == "private")
            oid = self._next_oid()
            repo.branches["main"] = [(oid, {".gitattributes": (GITATTRIBUTES, False)})]
            self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}, {}

    def _info(self, user, repo, rev="main", **_):
        found = self._repo(repo, user)
        oid, files = self._head(found, rev)
        siblings = [{"rfilename": path} for path in sorted(files)]
        info = {"id": repo, "sha": oid, "private": found.private, "siblings": siblings}
        return 200, info, {}

    def _tree(self, user, repo, rev, sub="", **_):
        oid, files = self._head(self._repo(repo, user), rev)
        prefix = sub.strip("/")
        entries = []
        for path, (data, is_lfs) in sorted(files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            entry: dict[str, Any] = {
                "type": "file",
                "path": path,
                "size": len(data),
                "oid": git_blob_id(data),
            }
            if is_lfs:
                digest = hashlib.sha256(data).hexdigest()
                entry["lfs"] = {"oid": digest, "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return 200, entries, {}

    def _branch(self, user, repo, rev, **_):
        self._may_write(user, repo)
        found = self._repo(repo, user)
        with self._lock:
            if rev in found.branches:
                raise Failure(409, f"Reference refs/heads/{rev} already exists")
            found.branches[rev] = [self._head(found, "main")]
        return 200, {}, {}

    def _validate(self, body, **_):
        payload = json.loads(body)
        errors = [{"message": m} for m in validate_card(payload.get("content", ""))]
        return (400 if errors else 200), {"errors": errors, "warnings": []}, {}

    def _preupload(self, user, body, repo, rev, **_):
        self._may_write(user, repo)
        _, files = self._head(self._repo(repo, user), rev)
        out = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = (
                item["path"].lower().endswith(LFS_PATTERNS)
                or item["size"] > REGULAR_LIMIT
                or b"\0" in sample
            )
            oid = None
            if item["path"] in files:
                data, is_lfs = files[item["path"]]
                oid = hashlib.sha256(data).hexdigest() if is_lfs else git_blob_id(data)
            out.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return 200, {"files": out}, {}

    def _lfs_batch(self, user, body, repo, **_):
        self._may_write(user, repo)
        self._repo(repo, user)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise Failure(400, "this fake takes uploads only")
        if "basic" not in payload.get("transfers", ["basic"]):
            raise Failure(400, "this fake offers the basic transfer only")
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                verify = f"{self.url}/datasets/{repo}.git/info/lfs/objects/verify"
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{obj['oid']}"},
                    "verify": {"href": verify},
                }
            objects.append(entry)
        headers = {"Content-Type": "application/vnd.git-lfs+json"}
        return 200, {"transfer": "basic", "objects": objects}, headers

    def _lfs_upload(self, body, oid, **_):
        with self._lock:
            held = (
                self.hold_uploads_after is not None
                and sum(self.uploads.values()) >= self.hold_uploads_after
            )
        if held:
            # The connection stays open with nothing stored, as when a client dies
            # mid-upload; the test kills the client meanwhile.
            self.holding.set()
            self.release.wait(60)
            raise Failure(503, "upload abandoned")
        if hashlib.sha256(body).hexdigest() != oid:
            raise Failure(400, "content does not match the oid")
        with self._lock:
            self.lfs[oid] = body
            self.uploads[oid] += 1
        return 200, {}, {}

    def _lfs_verify(self, user, body, repo, **_):
        obj = json.loads(body)
        if (
            len(self.lfs.get(obj["oid"], b"")) != obj["size"]
            or obj["oid"] not in self.lfs
        ):
            raise Failure(404, f"object {obj['oid']} was not uploaded")
        return 200, {}, {}

    def _xet_token(self, **_):
        raise Failure(501, "Xet storage is not offered by this server")

    def _commit(self, user, body, repo, rev, **_):
        self._may_write(user, repo)
        found = self._repo(repo, user)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise Failure(400, "the commit has no header line")
        with self._lock:
            parent, files = self._head(found, rev)
            expected = lines[0]["value"].get("parentCommit")
            if expected and expected != parent:
                raise Failure(412, "A commit has happened since the parent commit")
            files = dict(files)
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                if key == "file":
                    files[value["path"]] = (base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    if value["oid"] not in self.lfs:
                        raise Failure(
                            422, f"LFS object {value['oid']} was never uploaded"
                        )
                    files[value["path"]] = (self.lfs[value["oid"]], True)
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise Failure(
                            404, "A file with this name doesn't exist", "EntryNotFound"
                        )
                    del files[value["path"]]
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: f for p, f in files.items() if not p.startswith(folder)}
                else:
                    raise Failure(400, f"unknown commit line {key!r}")
            oid = self._next_oid()
            found.branches[rev].append((oid, files))
        url = f"{self.url}/datasets/{repo}/commit/{oid}"
        return 200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None}, {}

    def _next_oid(self) -> str:
        self._commits += 1
        return hashlib.sha1(b"commit %d" % self._commits).hexdigest()


def validate_card(content: str) -> list[str]:
    """What the Hub would object to in a README's YAML header (a few checks)."""
    if not content.startswith("---\n"):
        return []
    header, sep, _ = content[4:].partition("\n---\n")
    if not sep:
        return ["the metadata header is not closed by a --- line"]
    try:
        meta = yaml.safe_load(header)
    except yaml.YAMLError as exc:
        return [f"the metadata header is not YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["the metadata header is not a mapping"]
    errors = []
    licenses = meta.get("license")
    for license in licenses if isinstance(licenses, list) else [licenses]:
        if license is not None and license not in LICENSES:
            errors.append(f'"license" must be a licence id, not {license!r}')
    sizes = meta.get("size_categories") or []
    for size in sizes if isinstance(sizes, list) else [sizes]:
        if size not in SIZE_CATEGORIES:
            errors.append(f'"size_categories" has an unknown value {size!r}')
    for config in meta.get("configs") or []:
        if not isinstance(config, dict) or "config_name" not in config:
            errors.append('"configs" entries need a config_name')
    return errors


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, method: str) -> None:
        split = urlsplit(self.path)
        body = self._body()
        try:
            status, payload, headers = self.hub.handle(
                method, split.path, parse_qs(split.query), self.headers, body
            )
        except Failure as failure:
            status, payload = failure.status, {"error": failure.error, **failure.extra}
            headers = {"X-Error-Message": failure.error}
            if failure.code:
                headers["X-Error-Code"] = failure.code
        except (KeyError, ValueError) as exc:
            status, payload, headers = 400, {"error": f"bad request: {exc}"}, {}
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            headers = {"Content-Type": "application/json", **headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")
