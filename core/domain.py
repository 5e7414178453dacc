"""Domain packs: a folder with pack.toml, few-shot prompts and wildcard lists."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .components import closest
from .errors import ConfigError, PluginError


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    question: str


class FewShot(BaseModel):
    """One example prompt in the community style of a checkpoint family."""

    id: str
    prompt: str
    negative_prompt: str = ""
    family: str = "sd15"
    notes: str = ""


class Domain(BaseModel):
    """A domain pack, loaded."""

    model_config = ConfigDict(extra="forbid")

    name: str
    word: str
    subject: str
    description: str = ""
    key_attributes_question: str
    attributes: list[Question]
    caption_questions: list[str] = Field(min_length=1)
    statistics: list[Question] = Field(default_factory=list)
    prompt_template: str
    negative_prompt: str
    fewshot: list[FewShot] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    default_profile: str = ""
    sources: dict[str, str] = Field(default_factory=dict)
    path: str = ""

    @property
    def wildcards_dir(self) -> Path:
        return Path(self.path) / "wildcards"

    def profile(self, name: str) -> dict[str, Any]:
        if not name:
            return {}
        if name not in self.profiles:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise ConfigError(
                f"domain '{self.name}' has no profile '{name}'"
                f"{closest(name, self.profiles) or f' (known: {known})'}"
            )
        return self.profiles[name]


def load_pack(path: str | Path) -> Domain:
    """Read a pack folder; every error names the file and the field."""
    path = Path(path)
    pack_file = path / "pack.toml"
    if not pack_file.is_file():
        raise ConfigError(f"{path}: not a domain pack (no pack.toml)")
    try:
        raw = tomllib.loads(pack_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{pack_file}: cannot parse: {exc}") from None

    questions = raw.get("questions", {})
    prompts = raw.get("prompts", {})
    data = {
        "name": raw.get("name", path.name),
        "word": raw.get("word", raw.get("name", path.name)),
        "subject": raw.get("subject", "subject"),
        "description": raw.get("description", ""),
        "key_attributes_question": questions.get("key_attributes", ""),
        "attributes": questions.get("attributes", []),
        "caption_questions": questions.get("captions", []),
        "statistics": questions.get("statistics", []),
        "prompt_template": prompts.get("template", ""),
        "negative_prompt": prompts.get("negative", ""),
        "settings": raw.get("settings", {}),
        "profiles": raw.get("profiles", {}),
        "default_profile": raw.get("default_profile", ""),
        "sources": raw.get("sources", {}),
        "path": str(path.resolve()),
    }
    fewshot_name = prompts.get("fewshot")
    if fewshot_name:
        data["fewshot"] = _read_fewshot(path / fewshot_name)
    try:
        return Domain.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{pack_file}: '{loc}': {err['msg']}") from None


def _read_fewshot(path: Path) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"{path}: few-shot file named in pack.toml does not exist")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON: {exc.msg}") from None
    return rows


def resolve_domain(name_or_path: str, packs: dict[str, Path]) -> Domain:
    """A registered domain name, or a path to a pack folder of the user's own."""
    candidate = Path(name_or_path).expanduser()
    if name_or_path in packs:
        return load_pack(packs[name_or_path])
    if candidate.is_dir():
        return load_pack(candidate)
    if "/" in name_or_path or name_or_path.startswith((".", "~")):
        what = "is not a folder" if candidate.exists() else "does not exist"
        raise ConfigError(f"domain pack folder {name_or_path} {what}")
    hint = (
        closest(name_or_path, packs)
        or f" (known: {', '.join(sorted(packs)) or 'none'})"
    )
    raise PluginError(f"unknown domain '{name_or_path}'{hint}")
