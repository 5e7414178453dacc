"""run.json: what ran, with which settings (and where each came from), on what."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from typing import TYPE_CHECKING, Any

from . import __version__
from .config import is_secret

if TYPE_CHECKING:
    from .engine import Engine, RunSummary

LIBRARIES = (
    "pydantic",
    "pluggy",
    "click",
    "pillow",
    "numpy",
    "dynamicprompts",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
)
OBSERVE_NOTE = (
    "components in observe mode record their scores and decisions but reject "
    "nothing; records they would have rejected are marked in their verdicts"
)


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the value of every secret-looking KEY=VALUE hidden."""
    out = []
    for arg in argv:
        key, sep, _ = arg.partition("=")
        out.append(f"{key}=<redacted>" if sep and is_secret(key.lstrip("-")) else arg)
    return out


def run_info(engine: Engine, status: str, summary: RunSummary | None) -> dict[str, Any]:
    resolved = engine.resolved
    components: dict[str, Any] = {}
    observing = []
    for stage, specs in resolved.components.items():
        for spec in specs:
            key = f"{stage}:{spec.key}"
            instance = engine._instances.get(key)
            described = {}
            if instance is not None:
                try:
                    described = instance.describe()
                    used = instance.usage()
                    if used:
                        described["usage"] = used
                except Exception as exc:  # describing must never break a run
                    described = {"error": str(exc)}
            owner = engine.plugins.owner(stage, spec.cls.name)
            info = engine.plugins.infos.get(owner)
            components[key] = {
                "component": spec.cls.name,
                "plugin": owner,
                "plugin_version": info.version if info else None,
                "mode": spec.mode,
                **described,
            }
            if spec.observe:
                observing.append(key)
    refs = engine.references.values()
    return {
        "chatroom": __version__,
        "status": status,
        "kind": engine.kind,
        "fingerprint": engine.fingerprint,
        "inputs": resolved.inputs_digest(
            [r.sha256 for r in engine.references.values()]
        ),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": redact_argv(sys.argv),
        "domain": {"name": resolved.domain.name, "path": resolved.domain.path},
        "settings": resolved.settings_with_sources(),
        "components": components,
        "observe": {"components": observing, "note": OBSERVE_NOTE}
        if observing
        else None,
        "plugins": {n: i.version for n, i in sorted(engine.plugins.infos.items())},
        "plugin_failures": [f.__dict__ for f in engine.plugins.failures],
        "libraries": library_versions(),
        "references": {
            "folder": str(resolved.settings.references),
            "count": len(engine.references),
            "images": [r.model_dump() for r in refs],
        },
        "summary": summary.__dict__ if summary else None,
    }
