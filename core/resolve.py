"""Resolving a run: config layers + domain pack + components -> a validated plan."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import config as cfg
from .components import Component, closest, validate_options
from .domain import Domain, resolve_domain
from .errors import ConfigError, MissingDependency
from .manager import Plugins

log = logging.getLogger(__name__)

GENERIC_KEYS = ("use", "mode", "enabled", "domains")
PACK_LAYERS = ("domain:", "profile")
MODES = ("enforce", "observe")
SECTION_STAGE = {
    "extractor": "extractor",
    "prompter": "prompter",
    "generator": "generator",
    "filters": "filter",
    "annotators": "annotator",
}


@dataclass
class ComponentSpec:
    """One configured component: which class, under which key, with which options."""

    stage: str
    key: str
    cls: type[Component]
    options: Any
    mode: str = "enforce"

    @property
    def observe(self) -> bool:
        return self.mode == "observe"


@dataclass
class Request:
    """What the user asked for: a config file, command-line flags and overrides."""

    config_path: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)


@dataclass
class Resolved:
    settings: cfg.RunSettings
    domain: Domain
    components: dict[str, list[ComponentSpec]]
    flat: dict[str, Any]
    sources: dict[str, str]

    def one(self, stage: str) -> ComponentSpec:
        return self.components[stage][0]

    def inputs_digest(self, reference_hashes: list[str]) -> str:
        """What the run reads besides its settings: the domain pack and the photos."""
        body = {
            "domain": self.domain.model_dump(exclude={"path", "settings", "profiles"}),
            "references": sorted(reference_hashes),
        }
        return _digest(body)

    def fingerprint(self, reference_hashes: list[str]) -> str:
        """Identifies what a run produces; item ids derive from it."""
        settings = {
            k: v
            for k, v in self.flat.items()
            if k.split(".")[0] not in cfg.RUN_CONTROL and not cfg.is_secret(k)
        }
        return _digest(
            {"settings": settings, "inputs": self.inputs_digest(reference_hashes)}
        )

    def settings_with_sources(self) -> dict[str, dict[str, Any]]:
        redacted = cfg.redact(self.flat)
        return {
            k: {"value": redacted[k], "source": self.sources[k]}
            for k in sorted(self.flat)
        }


def resolve(request: Request, plugins: Plugins) -> Resolved:
    """Merge every layer, load the domain and validate each component's options."""
    user = cfg.load_file(request.config_path) if request.config_path else {}
    overrides: dict[str, Any] = {}
    for text in request.overrides:
        _deep_update(overrides, cfg.parse_override(text))
    flags = {k: v for k, v in request.flags.items() if v is not None}

    def pick(key: str, default: Any = "") -> Any:
        for layer in (flags, overrides, user):
            if key in layer:
                return layer[key]
        return default

    domain = resolve_domain(str(pick("domain", "fashion")), plugins.domains)
    profile = str(pick("profile", "") or domain.default_profile)

    layers = cfg.Layered()
    layers.add(domain.settings, f"domain:{domain.name}")
    layers.add(domain.profile(profile), f"profile:{profile}" if profile else "profile")
    if request.config_path:
        layers.add(user, f"config:{request.config_path}")
    layers.add(overrides, "--set")
    layers.add(flags, "command line")
    for key, value in (("domain", domain.name), ("profile", profile)):
        source = layers.sources.get(key, "default")
        layers.add({key: value}, source)

    settings = cfg.validate_run_settings(layers.data)
    components: dict[str, list[ComponentSpec]] = {}
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}

    top = settings.model_dump(exclude=set(SECTION_STAGE))
    for key, value in cfg.flatten(top).items():  # ray.pool, ray.gpus...
        flat[key] = value
        sources[key] = layers.sources.get(key, "default")

    for section, stage in SECTION_STAGE.items():
        raw = getattr(settings, section)
        entries = (
            raw.items() if section in ("filters", "annotators") else [(section, raw)]
        )
        specs = []
        for key, body in entries:
            prefix = section if key == section else f"{section}.{key}"
            spec = _component(stage, key, prefix, body, plugins, layers, domain)
            if spec is None:
                continue
            specs.append(spec)
            options = spec.options.model_dump(mode="json")
            generic = {"use": spec.cls.name}
            if stage in ("filter", "annotator"):
                generic["mode"] = spec.mode
            for name, value in cfg.flatten({**generic, **options}).items():
                full = f"{prefix}.{name}"
                flat[full] = value
                sources[full] = layers.sources.get(full, f"default ({spec.cls.name})")
        if stage == "filter":
            specs.sort(key=lambda s: s.cls.cost)
        if stage in ("extractor", "prompter", "generator") and not specs:
            raise ConfigError(f"no {stage} configured: set {section}.use")
        components[stage] = specs
    return Resolved(settings, domain, components, flat, sources)


def _component(
    stage: str,
    key: str,
    prefix: str,
    body: Any,
    plugins: Plugins,
    layers: cfg.Layered,
    domain: Domain,
) -> ComponentSpec | None:
    if not isinstance(body, dict):
        raise ConfigError(f"{prefix}: expected a table of options, got {body!r}")
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{prefix}.enabled = {enabled!r}: expected true or false")
    if enabled is False:
        return None
    domains = body.get("domains")
    if domains is not None:
        if not isinstance(domains, list) or not all(
            isinstance(d, str) for d in domains
        ):
            raise ConfigError(
                f"{prefix}.domains = {domains!r}: expected a list of domain names"
            )
        if stage not in ("filter", "annotator"):
            raise ConfigError(f"{prefix}.domains: only filters and annotators take it")
        if not domains:
            raise ConfigError(
                f"{prefix}.domains is empty: name a domain, or set enabled = false"
            )
        known = sorted({*plugins.domains, domain.name})
        for name in domains:
            if name not in known:
                raise ConfigError(
                    f"{prefix}.domains: unknown domain '{name}'"
                    f"{closest(name, known) or ' (known: ' + ', '.join(known) + ')'}"
                )
        if domain.name not in domains:
            return None
    name = body.get("use") or (key if stage in ("filter", "annotator") else "")
    if not name:
        raise ConfigError(
            f'{prefix}: say which {stage} to use, e.g. {prefix}.use = "..."'
        )
    cls = plugins.component(stage, str(name))
    mode = body.get("mode", "enforce")
    if mode not in MODES:
        raise ConfigError(
            f"{prefix}.mode = {mode!r}: expected one of {', '.join(MODES)}"
        )
    if mode == "observe" and stage not in ("filter", "annotator"):
        raise ConfigError(f"{prefix}.mode: only filters and annotators can observe")
    raw = {k: v for k, v in body.items() if k not in GENERIC_KEYS}
    # A pack's defaults (steps, cfg_scale...) apply to the components that take them;
    # the user's own settings must all be understood.
    for option in list(raw):
        full = f"{prefix}.{option}"
        found = [
            src
            for key, src in layers.sources.items()
            if key == full or key.startswith(full + ".")
        ]
        if option not in cls.Options.model_fields and all(
            src.startswith(PACK_LAYERS) for src in found
        ):
            log.debug(
                "%s: %s does not take '%s' from the pack", prefix, cls.name, option
            )
            del raw[option]

    options = validate_options(
        cls, prefix, raw, lambda option: layers.sources.get(f"{prefix}.{option}")
    )
    return ComponentSpec(stage=stage, key=key, cls=cls, options=options, mode=mode)


def check_libraries(resolved: Resolved) -> None:
    """Stop before any work when a component's library is not installed."""
    needs = [
        (library, requirement, spec.cls.name)
        for specs in resolved.components.values()
        for spec in specs
        for library, requirement in spec.cls.requires
    ]
    if resolved.settings.executor == "ray":
        needs.append(("ray", "chatroom[ray]", "executor 'ray'"))
    for library, requirement, who in needs:
        if importlib.util.find_spec(library) is None:
            extra = re.search(r"\[(.+)\]", requirement)
            raise MissingDependency(library, extra.group(1) if extra else "", who)


def _deep_update(into: dict, other: dict) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def _digest(body: dict) -> str:
    text = json.dumps(body, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Settings (outside run control) whose values differ between two runs.

    An option that only one side has, at its default, is not a change: a plugin
    upgrade that adds or drops an option leaves earlier runs resumable.
    """
    out = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in cfg.RUN_CONTROL:
            continue
        if key not in old or key not in new:
            side = new.get(key) or old.get(key)
            if str(side.get("source", "")).startswith("default"):
                continue
        if old.get(key, {}).get("value") != new.get(key, {}).get("value"):
            out.append(key)
    return out


def references_folder(resolved: Resolved) -> Path:
    return Path(resolved.settings.references).expanduser()
