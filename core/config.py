"""Run configuration: layered settings with the source of every value.

Later layers win: component defaults, the domain pack, the pack's profile, the
user's config file (TOML or YAML), then the command line (flags and ``--set``).
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .components import closest
from .errors import ConfigError

SECRET_WORDS = ("key", "token", "secret", "password", "authorization")
# Keys that steer a run without changing what it produces: a resumed run may differ.
RUN_CONTROL = {
    "count",
    "output",
    "max_candidates",
    "stop_after",
    "queue_size",
    "references",
    "fresh",
    "executor",
    "address",
    "ray",
}
STOP_POINTS = ("attributes", "prompts")


class RaySettings(BaseModel):
    """How the Ray executor places components on actors (``executor = "ray"``)."""

    model_config = ConfigDict(extra="forbid")

    pool: int = Field(
        2,
        ge=1,
        description="Actors for each component that holds a local model (one with a "
        "`device` option); each works on one batch at a time.",
    )
    actors: dict[str, int | dict[str, int]] = Field(
        default_factory=dict,
        description="Actors for one component, by its place in the settings: "
        "`generator = 4`, `prompter = 1`, `filters = {nudenet = 2}`, `annotators = "
        "{captions = 1}`; 0 keeps it in the driver process.",
    )
    gpus: float = Field(
        1.0,
        gt=0,
        description="GPUs each actor of a CUDA component asks for (0.5: two share "
        "one GPU).",
    )
    cpus: float = Field(
        1.0,
        gt=0,
        description="CPUs each actor asks for; a component's `threads` option, when "
        "larger, wins.",
    )
    retries: int = Field(
        3,
        ge=0,
        description="Times a batch is redone after the actor running it died; the "
        "actor itself is always restarted.",
    )
    object_store_mb: int = Field(
        256, ge=80, description="Object store of a local Ray (no `address`)."
    )


class RunSettings(BaseModel):
    """The top-level settings of a run; components validate their own options."""

    model_config = ConfigDict(extra="forbid")

    domain: str = "fashion"
    profile: str = ""
    references: str = ""
    output: str = "out"
    count: int = Field(8, ge=1)
    seed: int = Field(0, ge=0, lt=2**32)
    reference_sample: int = Field(0, ge=0)
    max_candidates: int = Field(0, ge=0)
    stop_after: Literal["", "attributes", "prompts"] = ""
    queue_size: int = Field(4, ge=1)
    plan: Literal["marginal", "joint"] = "marginal"
    executor: Literal["local", "ray"] = Field(
        "local",
        description="`local` runs every stage in this process; `ray` runs the model "
        "stages on Ray actors (docs/ray.md).",
    )
    address: str = Field(
        "",
        description="The Ray cluster to join (`auto`, `ray://host:10001`); empty "
        "starts a local Ray for the run.",
    )
    ray: RaySettings = Field(default_factory=RaySettings)
    # false: no extractor runs and prompts name no attributes (the paper's ablation)
    extraction: bool = True
    extractor: dict[str, Any] = Field(default_factory=dict)
    prompter: dict[str, Any] = Field(default_factory=dict)
    generator: dict[str, Any] = Field(default_factory=dict)
    filters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    annotators: dict[str, dict[str, Any]] = Field(default_factory=dict)


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = tomllib.loads(text)
    except Exception as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{path}: cannot parse: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level")
    return data


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> nested dict; the value is read as TOML, else as a string."""
    if "=" not in text:
        raise ConfigError(
            f"--set {text!r}: expected KEY=VALUE, e.g. generator.steps=20"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return nest(key, value)


def nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, full + "."))
        else:
            out[full] = value
    return out


class Layered:
    """Merges layers of nested settings and remembers which layer set each value."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.sources: dict[str, str] = {}

    def add(self, layer: dict[str, Any], source: str) -> None:
        self._merge(self.data, copy.deepcopy(layer), source, "")

    def _merge(self, into: dict, layer: dict, source: str, prefix: str) -> None:
        for key, value in layer.items():
            full = f"{prefix}{key}"
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                self._merge(into[key], value, source, full + ".")
            else:
                into[key] = value
                if isinstance(value, dict):
                    for sub in flatten(value, full + "."):
                        self.sources[sub] = source
                self.sources[full] = source

    def get(self, key: str, default: Any = None) -> Any:
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    def source(self, key: str) -> str:
        while key:
            if key in self.sources:
                return self.sources[key]
            key = key.rpartition(".")[0]
        return "default"


def validate_run_settings(data: dict[str, Any]) -> RunSettings:
    try:
        return RunSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = _section_hint(loc, data) or closest(loc, RunSettings.model_fields)
            raise ConfigError(f"unknown setting '{loc}'{hint}") from None
        msg = err["msg"][0].lower() + err["msg"][1:]
        raise ConfigError(f"setting '{loc}' = {err.get('input')!r}: {msg}") from None


def _section_hint(key: str, data: dict[str, Any]) -> str:
    """' (did you mean generator.steps?)' when a stage's section has that option."""
    for section in ("generator", "prompter", "extractor"):
        if isinstance(data.get(section), dict) and key in data[section]:
            return f" (did you mean '{section}.{key}'?)"
    for section in ("filters", "annotators"):
        for name, body in (data.get(section) or {}).items():
            if isinstance(body, dict) and key in body:
                return f" (did you mean '{section}.{name}.{key}'?)"
    return ""


def is_secret(key: str) -> bool:
    """Whether a setting's value is a secret (``api_key``, ``hf_token``...).

    Names of environment variables (``api_key_env``) and counts (``max_tokens``)
    are not secrets.
    """
    last = key.rsplit(".", 1)[-1].lower()
    if last.endswith("_env") or last.endswith("tokens"):
        return False
    return any(word in last for word in SECRET_WORDS)


def redact(flat: dict[str, Any]) -> dict[str, Any]:
    """Replace the value of every secret-looking key with a marker."""
    return {
        k: ("<redacted>" if is_secret(k) and v not in (None, "") else v)
        for k, v in flat.items()
    }
