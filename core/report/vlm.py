"""Yes/no answers from a vision-language model, for the attribute statistics.

``load_vlm(config, domain)`` builds a registered component that can look at images:
one with an ``ask(images, question)`` method returning one answer per image, as the
BLIP-2 extractor and caption annotator do. The config file names it in a ``[vlm]``
table (``use`` and its options); a run config without one lends its ``[extractor]``.

``YesNo`` turns the answers into True (yes), False (no) or None (anything else: an
empty, garbled or hedging answer counts as unclear) and caches them in
``OUT/report/vlm-answers.jsonl``, keyed by the model, the image's content hash and
the question, so a report built again asks only about images it has not seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

CACHE_FILE = "vlm-answers.jsonl"
CHUNK = 32  # images loaded and asked at once; the cache is written after each
STAGES = ("extractor", "annotator")  # where components that can look are registered
YES = {"yes", "yeah", "yep", "true"}
NO = {"no", "nope", "false"}
_WORD = re.compile(r"[a-z]+")


def yes_no(text: str | None) -> bool | None:
    """True for an answer that starts with yes, False for no, None otherwise."""
    words = _WORD.findall((text or "").lower())
    if not words:
        return None
    if words[0] in YES:
        return True
    if words[0] in NO:
        return False
    return None


def _answer_text(answer: Any) -> str | None:
    """The text of one answer: a string, or an object with ``text`` (BLIP-2's)."""
    if answer is None or isinstance(answer, str):
        return answer
    return getattr(answer, "text", None)


def load_vlm(config: str | Path, domain, plugins=None):
    """The component a config file names in ``[vlm]`` (else its ``[extractor]``)."""
    from ..components import Context, validate_options
    from ..config import load_file
    from ..errors import PluginError
    from ..manager import Plugins

    data = load_file(config)
    table, where = data.get("vlm"), "vlm"
    if table is None:
        table, where = data.get("extractor"), "extractor"
    if not isinstance(table, dict) or not table.get("use"):
        raise ConfigError(
            f"--vlm {config}: no [vlm] table naming a model, e.g. "
            '[vlm] use = "blip2" with model = "/path/to/blip2"'
        )
    plugins = plugins or Plugins()
    name = str(table["use"])
    cls = None
    for stage in STAGES:
        try:
            cls = plugins.component(stage, name)
            break
        except PluginError:
            continue
    if cls is None or not callable(getattr(cls, "ask", None)):
        raise ConfigError(
            f"--vlm {config}: {where}.use = {name!r} is no registered component "
            "that answers questions about images (it needs an ask() method)"
        )
    raw = {k: v for k, v in table.items() if k not in ("use", "mode", "enabled")}
    options = validate_options(cls, where, raw)
    return cls(options, Context(domain))


def describe_vlm(vlm: Any) -> str:
    """A short stable name of the model behind ``vlm``, for the cache and the page."""
    options = getattr(vlm, "options", None)
    dumped = options.model_dump(mode="json") if options is not None else {}
    model = dumped.get("model", "")
    name = getattr(vlm, "name", "") or type(vlm).__name__
    return f"{name} ({model})" if model else name


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class YesNo:
    """Asks a VLM yes/no questions about image files, with a cache on disk."""

    def __init__(self, vlm: Any, cache_dir: Path | None):
        self.vlm = vlm
        self.name = describe_vlm(vlm)
        self.cache_path = cache_dir / CACHE_FILE if cache_dir is not None else None
        self.cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.asked = 0  # answers that came from the model, not the cache
        self._hashes: dict[Path, str] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            from .load import read_jsonl

            for row in read_jsonl(self.cache_path):
                if row.get("vlm") == self.name:
                    self.cache[(row.get("image"), row.get("question"))] = row

    def _hash(self, path: Path) -> str | None:
        if path not in self._hashes:
            try:
                self._hashes[path] = file_hash(path)
            except OSError as exc:
                log.warning("%s: cannot read: %s", path, exc)
                return None
        return self._hashes[path]

    def __call__(self, paths: list[Path], question: str) -> list[bool | None]:
        hashes = [self._hash(p) for p in paths]
        missing = [
            i
            for i, h in enumerate(hashes)
            if h is not None and (h, question) not in self.cache
        ]
        for start in range(0, len(missing), CHUNK):
            self._ask(
                [(paths[i], hashes[i]) for i in missing[start : start + CHUNK]],
                question,
            )
        return [
            None if h is None else self.cache.get((h, question), {}).get("yes")
            for h in hashes
        ]

    def _ask(self, items: list[tuple[Path, str]], question: str) -> None:
        from PIL import Image

        images, kept = [], []
        for path, digest in items:
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
                kept.append(digest)
            except (OSError, ValueError) as exc:  # one bad image is unclear, no more
                log.warning("%s: not asked: %s", path, exc)
        if not images:
            return
        answers = self.vlm.ask(images, question)
        rows = []
        for digest, answer in zip(kept, answers, strict=True):
            text = _answer_text(answer)
            row = {
                "vlm": self.name,
                "image": digest,
                "question": question,
                "answer": text,
                "yes": yes_no(text),
            }
            self.cache[(digest, question)] = row
            rows.append(row)
        self.asked += len(rows)
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    def close(self) -> None:
        close = getattr(self.vlm, "close", None)
        if callable(close):
            close()


def from_function(
    answer: Callable[[Path, str], bool | None],
) -> Callable[[list[Path], str], list[bool | None]]:
    """Ask ``answer(image_path, question)`` image by image; a failure is unclear."""

    def ask(paths: list[Path], question: str) -> list[bool | None]:
        out: list[bool | None] = []
        for path in paths:
            try:
                value = answer(path, question)
            except Exception as exc:  # one bad image must not sink the table
                log.warning("%s: no answer to %r: %s", path, question, exc)
                value = None
            out.append(None if value is None else bool(value))
        return out

    return ask
