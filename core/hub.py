"""Push a finished run to the Hugging Face Hub as a dataset repo with a dataset card.

The run is exported as Parquet shards (``chatroom.export``), then one commit adds
``data/shard-*.parquet``, ``data/_manifest.json`` and ``README.md``: a dataset card
whose YAML header the Hub reads (licence, tasks, size, the data files) and whose
body tells where every row came from. Shards of an earlier push that this export
does not name are deleted in the same commit.

The token is read from an environment variable and passed to ``huggingface_hub``
only; it is scrubbed from every message and from the card. Uploads go through the
library's own protocol (Xet when ``hf_xet`` is installed, else git-LFS), which
skips content the Hub already holds: a push that was interrupted uploads only what
is missing when run again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from . import __version__
from .config import redact
from .errors import ChatroomError, InputError, MissingDependency
from .export import DEFAULT_SHARD_SIZE, MANIFEST, ExportResult, export_parquet

log = logging.getLogger(__name__)

DEFAULT_TOKEN_ENV = "HF_TOKEN"
DEFAULT_REVISION = "main"
DATA_DIR = "data"
CARD = "README.md"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
RETRY_STATUS = (429, 500, 502, 503, 504)
# Hub licence ids (hf.co/docs/hub/repositories-licenses) a reference's licence text
# may name; anything else is "other".
HUB_LICENSES = (
    "apache-2.0",
    "mit",
    "cc0-1.0",
    "cc-by-2.0",
    "cc-by-3.0",
    "cc-by-4.0",
    "cc-by-sa-3.0",
    "cc-by-sa-4.0",
    "cc-by-nc-2.0",
    "cc-by-nc-3.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-3.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0",
    "bsd-3-clause",
    "gpl-3.0",
    "odc-by",
    "pddl",
    "openrail",
    "creativeml-openrail-m",
)
SIZES = (
    (1_000, "n<1K"),
    (10_000, "1K<n<10K"),
    (100_000, "10K<n<100K"),
    (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"),
)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    url: str  # the dataset's page
    commit_url: str
    changed: bool  # False when the Hub already held exactly these files
    records: int
    files: list[str]  # paths in the repo that this push wrote
    deleted: list[str]  # stale shards of an earlier push
    export: ExportResult
    card: str


def push_to_hub(
    run_dir: str | Path,
    repo_id: str,
    *,
    dest: str | Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    private: bool = False,
    token_env: str = DEFAULT_TOKEN_ENV,
    revision: str = DEFAULT_REVISION,
    license: str | None = None,
    endpoint: str | None = None,
    tries: int = 4,
    retry_wait: float = 2.0,
) -> PushResult:
    """Export ``run_dir`` as Parquet (into ``dest``) and commit it with a card.

    ``endpoint`` defaults to the library's (``HF_ENDPOINT``, else huggingface.co).
    Answers 429 and 5xx, and lost connections, are tried ``tries`` times in all,
    waiting ``retry_wait`` seconds, then twice that, and so on, with jitter.
    """
    if not REPO_ID.fullmatch(repo_id or ""):
        raise InputError(f"--repo {repo_id!r} is not a Hub repo id: use ORG/NAME")
    if not revision or revision.startswith("refs/") or " " in revision:
        raise InputError(f"--revision {revision!r} is not a branch name")
    token = os.environ.get(token_env, "").strip()
    if not token:
        raise InputError(
            f"no Hub token: set {token_env} to an access token with write access "
            "(or name another variable with --token-env)"
        )
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise MissingDependency(
            "huggingface_hub", "hub", "export --format hub"
        ) from None

    exported = export_parquet(run_dir, dest, shard_size)
    card = _scrub(dataset_card(run_dir, exported, repo_id, license), token)
    api = HfApi(
        endpoint=endpoint,
        token=token,
        library_name="chatroom",
        library_version=__version__,
    )
    hub = _Caller(api.endpoint, repo_id, revision, token, token_env, tries, retry_wait)
    with _quiet_library():
        user = hub.call("checking the token", api.whoami)
        log.info("pushing to %s as %s", repo_id, user.get("name", "?"))
        hub.call(
            "creating the repo",
            api.create_repo,
            repo_id,
            repo_type="dataset",
            private=True if private else None,  # None: the namespace's default
            exist_ok=True,
        )
        if revision != DEFAULT_REVISION:
            hub.call(
                "creating the branch",
                api.create_branch,
                repo_id,
                branch=revision,
                repo_type="dataset",
                exist_ok=True,
            )
        existing = hub.call(
            "listing the repo's files",
            api.list_repo_files,
            repo_id,
            repo_type="dataset",
            revision=revision,
        )
        before = hub.call(
            "reading the branch",
            api.dataset_info,
            repo_id,
            revision=revision,
        ).sha
        operations, written, stale = _operations(exported, card, existing, token)
        fingerprint = _run_info(Path(run_dir)).get("fingerprint") or "?"
        commit = hub.call(
            "committing the files",
            api.create_commit,
            repo_id,
            operations,
            commit_message=f"chatroom run {fingerprint}: {exported.records} records",
            repo_type="dataset",
            revision=revision,
        )
    return PushResult(
        repo_id=repo_id,
        revision=revision,
        url=f"{api.endpoint}/datasets/{repo_id}",
        commit_url=str(commit.commit_url),
        changed=commit.oid != before,
        records=exported.records,
        files=written,
        deleted=stale,
        export=exported,
        card=card,
    )


def _operations(exported: ExportResult, card: str, existing, token: str):
    """The commit: the shards, the manifest and the card; stale shards deleted."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    names = [f"{DATA_DIR}/{shard['name']}" for shard in exported.shards]
    stale = sorted(
        path
        for path in existing
        if re.fullmatch(rf"{DATA_DIR}/shard-\d{{5}}\.parquet", path)
        and path not in names
    )
    operations: list[Any] = [CommitOperationDelete(path) for path in stale]
    operations += [
        CommitOperationAdd(path, str(exported.dest / shard["name"]))
        for path, shard in zip(names, exported.shards, strict=True)
    ]
    manifest = _public_manifest(exported, token)
    operations.append(CommitOperationAdd(f"{DATA_DIR}/{MANIFEST}", manifest))
    operations.append(CommitOperationAdd(CARD, card.encode()))
    return operations, [*names, f"{DATA_DIR}/{MANIFEST}", CARD], stale


@contextmanager
def _quiet_library() -> Iterator[None]:
    """No progress bars, and no notices on the library's own stderr handler: what
    the user needs to know comes back as results or our errors."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    quiet = are_progress_bars_disabled()
    library_log = logging.getLogger("huggingface_hub")
    level = library_log.level
    disable_progress_bars()
    library_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library_log.setLevel(level)
        if not quiet:
            enable_progress_bars()


# --- talking to the Hub -----------------------------------------------------------


class _Caller:
    """Calls the Hub with retries; turns what it answers into one clear line."""

    def __init__(self, endpoint, repo_id, revision, token, token_env, tries, wait):
        self.endpoint = endpoint
        self.host = urlsplit(endpoint).netloc or endpoint
        self.repo_id, self.revision = repo_id, revision
        self.token, self.token_env = token, token_env
        self.tries, self.wait = max(1, tries), wait

    def call(self, what: str, fn, *args, **kwargs):
        for attempt in range(1, self.tries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - sorted out below
                status, transient = self._classify(exc)
                if not transient or attempt == self.tries:
                    raise ChatroomError(
                        _scrub(self._message(what, exc, status, attempt), self.token)
                    ) from None
                pause = self.wait * 2 ** (attempt - 1) * random.uniform(0.8, 1.2)
                log.warning(
                    "the Hub answered %s while %s; trying again in %.1f s",
                    status or type(exc).__name__,
                    what,
                    pause,
                )
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _classify(self, exc: BaseException) -> tuple[int | None, bool]:
        """(HTTP status or None, whether trying again may help)."""
        import httpx2
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        cause = _root(exc)
        if isinstance(cause, OfflineModeIsEnabled):
            return None, False
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            return status, status in RETRY_STATUS
        if isinstance(cause, httpx2.TransportError):
            return None, True
        return None, False

    def _message(self, what: str, exc, status: int | None, tries: int) -> str:
        from huggingface_hub.errors import (
            OfflineModeIsEnabled,
            RevisionNotFoundError,
        )

        cause = _root(exc)
        repo, env = self.repo_id, self.token_env
        server = _server_message(cause)
        said = f": {server}" if server else ""
        if isinstance(cause, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set: unset it to push to the Hub"
        if isinstance(exc, ValueError) and "Invalid metadata in README.md" in str(exc):
            errors = "; ".join(
                line.lstrip("- ").strip()
                for line in str(exc).splitlines()[1:]
                if line.strip()
            )
            return f"the Hub rejected the dataset card's metadata: {errors or exc}"
        if status == 401:
            return (
                f"the Hub at {self.host} refused the token in {env} (401 "
                f"Unauthorized) while {what}: check that it is a valid access token"
            )
        if status == 403:
            return (
                f"the token in {env} may not write to {repo} (403 Forbidden{said}): "
                "use a token with write access to that namespace"
            )
        if status == 404 and isinstance(cause, RevisionNotFoundError):
            return f"branch {self.revision!r} of {repo} was not found on the Hub (404)"
        if status == 404:
            return (
                f"{repo} was not found on the Hub at {self.host} (404 Not Found) "
                f"while {what}: check the repo id and the token's access"
            )
        if status in (409, 412):
            reason = "Conflict" if status == 409 else "Precondition Failed"
            return (
                f"the Hub refused {what} for {repo} ({status} {reason}{said}): "
                "another push may be under way; run the command again"
            )
        if status is not None and status in RETRY_STATUS:
            return (
                f"the Hub at {self.host} answered {status} while {what}, "
                f"{tries} time{'s' * (tries != 1)}: try again later (a push run "
                "again uploads only what is missing)"
            )
        if status is not None:
            return f"the Hub answered {status} while {what} for {repo}{said}"
        if tries > 1:
            return (
                f"cannot reach the Hub at {self.endpoint} while {what} "
                f"({type(cause).__name__}, {tries} tries): check the address and "
                "the network"
            )
        text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        if "xet" in text.lower():
            text += " (for a server without Xet storage, set HF_HUB_DISABLE_XET=1)"
        return f"pushing to {repo} failed while {what}: {text}"


def _root(exc: BaseException) -> BaseException:
    """The HTTP error behind the library's wrappers (an upload wraps its cause)."""
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, httpx2.HTTPError | OfflineModeIsEnabled):
            return seen
        seen = seen.__cause__
    return exc


def _server_message(exc: BaseException) -> str:
    text = getattr(exc, "server_message", None) or ""
    return " ".join(str(text).split())[:200]


def _scrub(text: str, token: str) -> str:
    return text.replace(token, "<redacted>") if token else text


def _public_manifest(exported: ExportResult, token: str) -> bytes:
    """The export's manifest without the local path of the run folder."""
    manifest = json.loads(exported.manifest.read_text(encoding="utf-8"))
    run = manifest.get("run") or {}
    if run.get("path"):
        run["path"] = Path(run["path"]).name
    text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    return _scrub(text, token).encode()


# --- the dataset card -------------------------------------------------------------


def dataset_card(
    run_dir: str | Path,
    exported: ExportResult,
    repo_id: str,
    license: str | None = None,
) -> str:
    """README.md for the dataset repo: the Hub's YAML header, then what and how."""
    from .report import stats
    from .report.load import load_run

    run = load_run(run_dir)
    info = run.info
    rows = run.records
    domain = (info.get("domain") or {}).get("name") or "images"
    references = run.references
    funnel = stats.funnel(run)

    has = {
        "masks": any(row.get("masks") for row in rows),
        "captions": any(row.get("caption") for row in rows),
        "keypoints": any(row.get("keypoints") for row in rows),
    }
    tasks = ["text-to-image"]
    tasks += ["image-segmentation"] if has["masks"] else []
    tasks += ["image-to-text"] if has["captions"] else []
    tasks += ["keypoint-detection"] if has["keypoints"] else []
    size = next((name for top, name in SIZES if exported.records < top), "other")

    meta: dict[str, Any] = {}
    if license:
        meta["license"] = license
    else:
        meta.update(_licence_header(references))
    meta.update(
        {
            "pretty_name": f"{domain} images made with chatroom",
            "task_categories": tasks,
            "size_categories": [size],
            "tags": ["synthetic", "chatroom", domain],
            "configs": [
                {
                    "config_name": "default",
                    "data_files": [
                        {"split": "train", "path": f"{DATA_DIR}/shard-*.parquet"}
                    ],
                }
            ],
        }
    )
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)

    parts = ["the prompt that made it", "its generation settings"]
    parts += ["the filters' verdicts", *(f"its {k}" for k, v in has.items() if v)]
    body = [
        f"# {repo_id}",
        "",
        f"{exported.records} synthetic {domain} images, each with "
        f"{', '.join(parts[:-1])} and {parts[-1]}. Made with chatroom "
        f"{info.get('chatroom') or __version__}, which "
        "reproduces the pipeline of *Fashion-Chatroom* (reference photos, a "
        "vision-language model for attributes, an LLM for Stable Diffusion prompts, "
        "filters, annotations) for any domain.",
        "",
        f"Run `{info.get('fingerprint') or '?'}`, status "
        f"{info.get('status') or '?'}, last updated {info.get('updated') or '?'}.",
        "",
        "## Loading",
        "",
        "```python",
        "import datasets",
        "",
        f'ds = datasets.load_dataset("{repo_id}", split="train")',
        'ds = ds.cast_column("image", datasets.Image())',
        "```",
        "",
        "Each row holds every column of the run's `metadata.jsonl` (`prompt`, "
        "`negative_prompt`, `seed`, `settings`, `attributes`, `references`, "
        "`verdicts`, ...), the PNG bytes in `image` and the masks in `mask_images` "
        f"(`{{part, png}}`). Columns listed in `{DATA_DIR}/{MANIFEST}` under "
        "`json_columns` hold JSON text.",
        "",
        *_lineage(info, references, funnel),
        *_funnel_section(funnel, exported),
        *_models_section(info),
        *_settings_section(info),
        *_references_section(references, license),
        *_files_section(exported),
        *_libraries_section(info),
    ]
    return f"---\n{header}---\n\n" + "\n".join(body).rstrip() + "\n"


def _licence_header(references: list[dict[str, Any]]) -> dict[str, Any]:
    """The licence field from the references' licences: each as a Hub id."""
    ids = []
    for ref in references:
        ids.append(_hub_licence(ref.get("license")))
    ids = sorted(set(ids)) or ["unknown"]
    out: dict[str, Any] = {"license": ids[0] if len(ids) == 1 else ids}
    if "other" in ids:
        out["license_name"] = "reference-image-licences"
    return out


def _hub_licence(text: str | None) -> str:
    if not text or not str(text).strip():
        return "unknown"
    word = re.sub(r"[\s_]+", "-", str(text).strip().lower())
    word = re.sub(r"-?licen[sc]e$", "", word)
    word = word.replace("creative-commons-", "cc-")
    return word if word in HUB_LICENSES else "other"


def _component(info: dict[str, Any], stage: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (key.split(":", 1)[1], value)
        for key, value in (info.get("components") or {}).items()
        if key.startswith(stage + ":") and isinstance(value, dict)
    ]


def _names(info: dict[str, Any], stage: str) -> str:
    found = [
        f"`{value.get('component', name)}`"
        + (f" ({value['model']})" if isinstance(value.get("model"), str) else "")
        + (" in observe mode" if value.get("mode") == "observe" else "")
        for name, value in _component(info, stage)
    ]
    return ", ".join(found) or "none"


def _lineage(info, references, funnel) -> list[str]:
    settings = _settings(info)
    generation = [
        f"{key.split('.', 1)[1]} {_public(value)}"
        for key, value in settings.items()
        if key.startswith("generator.")
        and key != "generator.use"
        and value not in (None, "", [], {})
    ]
    rejected = sum(step["rejected"] for step in funnel["steps"])
    return [
        "## How it was made",
        "",
        "Every row carries its whole lineage; this is the run in brief.",
        "",
        f"1. **Reference images**: {len(references)} images "
        "(listed with their licences below).",
        f"2. **Attributes**: the extractor {_names(info, 'extractor')} named the "
        "domain's key attributes and read their values off each reference "
        "(`attributes` and `bank_entries` in each row).",
        f"3. **Prompts**: the prompter {_names(info, 'prompter')} wrote one "
        "positive and negative prompt per item from sampled attribute values "
        "(`prompt`, `negative_prompt`, `prompt_writer`).",
        f"4. **Settings**: the generator {_names(info, 'generator')} made each "
        "image with a seed of its own"
        + (f" ({_cell('; '.join(generation))})" if generation else "")
        + "; a row's `settings` and `seed` reproduce it.",
        f"5. **Filters**: {_names(info, 'filter')} judged {funnel['candidates']} "
        f"candidates and rejected {rejected} (see Counts); each row keeps the "
        "verdicts it passed (`verdicts`).",
        f"6. **Annotations**: {_names(info, 'annotator')}"
        + (
            " added their annotations (`masks`, `keypoints`, `caption`, `qa`)."
            if _component(info, "annotator")
            else " (no annotator ran)."
        ),
        "",
    ]


def _funnel_section(funnel: dict[str, Any], exported: ExportResult) -> list[str]:
    lines = [
        "## Counts",
        "",
        "| step | count | reasons |",
        "| --- | --- | --- |",
        f"| candidates generated | {funnel['candidates']} | |",
    ]
    for step in funnel["steps"]:
        reasons = "; ".join(
            f"{reason} ({count})" for reason, count in list(step["reasons"].items())[:5]
        )
        lines.append(
            f"| rejected by {step['stage']} `{step['component']}` | "
            f"{step['rejected']} | {_cell(reasons)} |"
        )
    failures = "; ".join(f"{k} ({v})" for k, v in funnel["failures"].items())
    lines.append(f"| failed | {sum(funnel['failures'].values())} | {_cell(failures)} |")
    lines.append(f"| records written by the run | {funnel['records']} | |")
    skipped = "; ".join(s["reason"] for s in exported.skipped[:5])
    lines.append(f"| skipped at export | {len(exported.skipped)} | {_cell(skipped)} |")
    lines.append(f"| **rows in this dataset** | **{exported.records}** | |")
    return [*lines, ""]


def _models_section(info: dict[str, Any]) -> list[str]:
    lines = [
        "## Models",
        "",
        "| stage | component | plugin | model | hash |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, value in (info.get("components") or {}).items():
        if not isinstance(value, dict):
            continue
        stage = key.split(":", 1)[0]
        flat = _flatten({k: v for k, v in value.items() if k != "usage"})
        models = [
            f"{_public(v)}" if k == "model" else f"{k}: {_public(v)}"
            for k, v in flat.items()
            if (k == "model" or k.endswith("_model") or k.endswith(".model"))
            and v not in (None, "")
        ]
        hashes = [
            f"{v}" if k == "sha256" else f"{k}: {v}"
            for k, v in flat.items()
            if ("sha256" in k or k.endswith("hash")) and v not in (None, "")
        ]
        plugin = f"{value.get('plugin') or '?'} {value.get('plugin_version') or ''}"
        lines.append(
            f"| {stage} | `{value.get('component', '?')}` | {_cell(plugin.strip())} | "
            f"{_cell('; '.join(models))} | {_cell('; '.join(hashes))} |"
        )
    observe = info.get("observe") or {}
    if observe.get("components"):
        lines += ["", f"In observe mode: {', '.join(observe['components'])}. "]
        lines[-1] += str(observe.get("note") or "")
    return [*lines, ""]


def _settings(info: dict[str, Any]) -> dict[str, Any]:
    raw = info.get("settings") or {}
    values = {
        key: (item.get("value") if isinstance(item, dict) else item)
        for key, item in raw.items()
    }
    return redact(values)


def _settings_section(info: dict[str, Any]) -> list[str]:
    raw = info.get("settings") or {}
    lines = [
        "## Run settings",
        "",
        "Every resolved setting and where it came from (secrets are redacted, "
        "local paths shortened to their last part).",
        "",
        "| setting | value | from |",
        "| --- | --- | --- |",
    ]
    for key, value in _settings(info).items():
        item = raw.get(key)
        source = item.get("source", "") if isinstance(item, dict) else ""
        if ":" in str(source):
            kind, _, where = str(source).partition(":")
            source = f"{kind}:{_public(where)}"
        shown = json.dumps(_public(value), ensure_ascii=False)
        lines.append(f"| `{key}` | {_cell(shown)} | {_cell(str(source))} |")
    return [*lines, ""]


def _references_section(references, license) -> list[str]:
    counts = Counter((ref.get("license") or "not stated") for ref in references)
    summary = ", ".join(f"{name} ({n})" for name, n in counts.most_common())
    lines = [
        "## Reference images and their licences",
        "",
        f"The prompts were built from {len(references)} reference images under: "
        f"{summary or 'none listed'}.",
        "",
        "The generated images copy no reference, but their attributes come from "
        "them: respect these terms, and the generator model's licence, when you "
        "use the dataset."
        + (
            ""
            if license
            else " The `license` field above lists the references' licences; "
            "set another with `--license` when you know better."
        ),
        "",
        "| reference | licence | source | sha256 |",
        "| --- | --- | --- | --- |",
    ]
    for ref in references:
        lines.append(
            f"| {_cell(str(ref.get('id')))} | "
            f"{_cell(str(ref.get('license') or 'not stated'))} | "
            f"{_cell(str(ref.get('source') or 'not stated'))} | "
            f"`{str(ref.get('sha256') or '')[:16]}` |"
        )
    return [*lines, ""]


def _files_section(exported: ExportResult) -> list[str]:
    lines = [
        "## Files",
        "",
        "| file | rows | sha256 |",
        "| --- | --- | --- |",
    ]
    for shard in exported.shards:
        lines.append(
            f"| `{DATA_DIR}/{shard['name']}` | {shard['records']} | "
            f"`{shard['sha256']}` |"
        )
    lines += [
        "",
        f"`{DATA_DIR}/{MANIFEST}` lists the same with the records skipped at export "
        "and the reasons.",
        "",
    ]
    return lines


def _libraries_section(info: dict[str, Any]) -> list[str]:
    libraries = info.get("libraries") or {}
    found = [f"{name} {v}" for name, v in libraries.items() if v]
    plugins = [
        f"{name} {v}" if v else name for name, v in (info.get("plugins") or {}).items()
    ]
    return [
        "## Software",
        "",
        f"chatroom {info.get('chatroom') or __version__}; " + ", ".join(found) + ".",
        "",
        f"Plugins: {', '.join(plugins) or 'none'}.",
        "",
    ]


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
            for number, item in enumerate(value):
                out.update(_flatten(item, f"{name}.{number}."))
        else:
            out[name] = value
    return out


def _public(value: Any) -> Any:
    """A value fit for a public card: absolute local paths keep their last part."""
    if isinstance(value, str) and (
        value.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", value)
    ):
        return Path(value).name or value
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    return value


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _run_info(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
