"""Tables for `chatroom plugins`, `chatroom domains` and `chatroom doctor`."""

from __future__ import annotations

import importlib.util
import os

from .console import stdout
from .manager import Plugins


def _table(*columns):
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _add_row(table, *cells: str) -> None:
    """A row of plain text: brackets such as `chatroom[offline]` are not markup."""
    from rich.text import Text

    table.add_row(*(Text(str(cell)) for cell in cells))


def show_plugins() -> None:
    import logging

    logging.getLogger("chatroom.manager").setLevel(logging.ERROR)  # listed below
    plugins = Plugins()
    table = _table("plugin", "version", "stages", "components")
    for name, info in sorted(plugins.infos.items()):
        stages = sorted(info.stages) + (["domain"] if info.domains else [])
        parts = [c.split(":", 1)[1] for c in sorted(set(info.components))]
        parts += [f"{d} (domain)" for d in info.domains]
        _add_row(table, name, info.version, ", ".join(stages), ", ".join(parts))
    console = stdout()
    console.print(table)
    for failure in plugins.failures:
        console.print(
            f"failed to load: {failure.name} ({failure.module}): {failure.error}",
            style="red",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def show_domains() -> None:
    from .domain import load_pack

    plugins = Plugins()
    table = _table("domain", "plugin", "word", "attributes", "profiles")
    for name, path in sorted(plugins.domains.items()):
        pack = load_pack(path)
        _add_row(
            table,
            name,
            plugins.domain_owners.get(name, ""),
            pack.word,
            ", ".join(q.name for q in pack.attributes),
            ", ".join(sorted(pack.profiles)),
        )
    stdout().print(table)


def show_doctor(config_path, domain, overrides, profile=None) -> bool:
    """Print one row per configured component; False when something is missing."""
    from .resolve import Request, resolve

    plugins = Plugins()
    flags = {"domain": domain, "profile": profile}
    resolved = resolve(Request(config_path, flags, overrides), plugins)
    table = _table("component", "uses", "check", "status")
    healthy = True
    for stage, specs in resolved.components.items():
        for spec in specs:
            for check, ok, detail in _checks(spec, resolved.domain):
                healthy = healthy and ok
                _add_row(
                    table,
                    f"{stage}:{spec.key}",
                    spec.cls.name,
                    check,
                    ("ok" if ok else "MISSING") + (f": {detail}" if detail else ""),
                )
    stdout().print(table)
    for failure in plugins.failures:
        stdout().print(
            f"plugin {failure.name} failed to load: {failure.error}",
            markup=False,
            highlight=False,
        )
    return healthy


def _in_hub_cache(repo_id: str) -> bool:
    """Whether a Hub model has a snapshot in the local cache (no network)."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"), "snapshots")
    return os.path.isdir(folder) and bool(os.listdir(folder))


def _checks(spec, domain):
    """(check, ok, detail) rows from the component's declared needs and options."""
    from .components import Context
    from .errors import ChatroomError

    try:  # what the component checks when it is built (models load later)
        spec.cls(spec.options, Context(domain)).close()
        yield "settings", True, ""
    except ChatroomError as exc:
        yield "settings", False, str(exc)
    for library, requirement in spec.cls.requires:
        found = importlib.util.find_spec(library) is not None
        yield (
            f"library {library}",
            found,
            "" if found else f"pip install '{requirement}'",
        )
    options = spec.options.model_dump()
    for key, value in options.items():
        if key in ("model", "config", "upscaler_model", "file") and isinstance(
            value, str
        ):
            if not value:
                if key == "model":
                    yield "weights model", False, "not set"
                continue
            if value.startswith("civitai:"):
                yield f"weights {key}", True, "from Civitai, cached on first use"
                continue
            local = os.path.exists(os.path.expanduser(value))
            hub = "/" in value and not value.startswith((".", "/", "~"))
            if local:
                yield f"weights {key}", True, "local"
            elif hub and _in_hub_cache(value):
                yield f"weights {key}", True, "Hub id, in the local cache"
            elif hub and not options.get("local_files_only", True):
                yield f"weights {key}", True, "Hub id, downloaded on first use"
            elif hub:
                yield (
                    f"weights {key}",
                    False,
                    f"Hub id {value} is not in the local cache (offline)",
                )
            else:
                yield f"weights {key}", False, f"not found: {value}"
        if key.endswith(("api_key_env", "token_env")) and value:
            present = bool(os.environ.get(value))
            yield f"key ${value}", present, "set" if present else "not set"
        if key in ("base_url", "url", "servers") and value:
            yield f"server {key}", True, "configured (not contacted)"
