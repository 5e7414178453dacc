"""The plugin manager: loads entry points one at a time and collects components.

Built-in plugins are listed in the same ``chatroom`` entry-point group as third-party
ones. ``CHATROOM_PLUGINS`` (comma-separated entry-point names) limits which load;
``CHATROOM_STRICT_PLUGINS=1`` makes a plugin that fails to import fatal.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pluggy

from . import hookspecs
from .components import STAGES, Component, closest
from .errors import PluginError

log = logging.getLogger(__name__)

GROUP = "chatroom"
REGISTRATION_HOOKS = {
    "extractor": "register_extractors",
    "prompter": "register_prompters",
    "generator": "register_generators",
    "filter": "register_filters",
    "annotator": "register_annotators",
}


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str
    distribution: str
    components: list[str] = field(default_factory=list)
    stages: set[str] = field(default_factory=set)
    domains: list[str] = field(default_factory=list)


@dataclass
class LoadFailure:
    name: str
    module: str
    error: str


class Plugins:
    """Registered plugins, their components by stage, and the domain packs."""

    def __init__(self, strict: bool | None = None, only: list[str] | None = None):
        if strict is None:
            strict = os.environ.get("CHATROOM_STRICT_PLUGINS", "") not in ("", "0")
        if only is None and os.environ.get("CHATROOM_PLUGINS"):
            only = [p.strip() for p in os.environ["CHATROOM_PLUGINS"].split(",")]
        self.strict = strict
        self.only = [p for p in only if p] if only is not None else None
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.failures: list[LoadFailure] = []
        self.components: dict[str, dict[str, type[Component]]] = {s: {} for s in STAGES}
        self.domains: dict[str, Path] = {}
        self.domain_owners: dict[str, str] = {}
        self.owners: dict[str, str] = {}
        self._load_entry_points()

    # --- loading -----------------------------------------------------------------

    def _load_entry_points(self) -> None:
        eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name)
        loaded: dict[str, str] = {}
        for ep in eps:
            if ep.name in loaded:
                if loaded[ep.name] != ep.value:
                    log.warning(
                        "plugin name '%s' is taken by %s; %s is not loaded",
                        ep.name,
                        loaded[ep.name],
                        ep.value,
                    )
                continue
            loaded[ep.name] = ep.value
            if self.only is not None and ep.name not in self.only:
                continue
            dist = ep.dist
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                version=dist.version if dist else "",
                distribution=dist.name if dist else "",
            )
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not stop the others
                self._fail(ep.name, ep.value, f"{type(exc).__name__}: {exc}")
                continue
            self._add_plugin(module, info)

    def register(self, plugin: object, name: str, version: str = "") -> None:
        """Register an in-process plugin object (tests, notebooks)."""
        module = getattr(plugin, "__name__", type(plugin).__name__)
        unknown = self._unknown_hooks(plugin)
        if unknown:
            raise PluginError(f"plugin '{name}' ({module}): {unknown}")
        self._add_plugin(plugin, PluginInfo(name, module, version, ""))

    def _add_plugin(self, plugin: object, info: PluginInfo) -> None:
        """Register one plugin and collect what it offers, or report why not."""
        unknown = self._unknown_hooks(plugin)
        if unknown:
            self._fail(info.name, info.module, unknown)
            return
        try:
            self.pm.register(plugin, name=info.name)
            self.pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            self._fail(info.name, info.module, str(exc).splitlines()[0])
            return
        try:
            offered = self._offers(info.name, plugin)
        except Exception as exc:
            self.pm.unregister(plugin)
            self._fail(info.name, info.module, f"{type(exc).__name__}: {exc}")
            return
        self.infos[info.name] = info
        for stage, item in offered:
            if stage == "domain":
                domain_name, path = item
                self._warn_replaced("domain", domain_name, self.domain_owners, info)
                self.domains[domain_name] = path
                self.domain_owners[domain_name] = info.name
                info.domains.append(domain_name)
            else:
                self._warn_replaced(stage, item.name, self.owners, info)
                self.components[stage][item.name] = item
                self.owners[f"{stage}:{item.name}"] = info.name
                info.stages.add(stage)
                info.components.append(f"{stage}:{item.name}")

    def _warn_replaced(self, stage: str, name: str, owners: dict, info) -> None:
        key = name if stage == "domain" else f"{stage}:{name}"
        if key in owners and owners[key] != info.name:
            log.warning(
                "%s '%s' of plugin '%s' replaces the one of plugin '%s'",
                stage,
                name,
                info.name,
                owners[key],
            )

    def _unknown_hooks(self, plugin: object) -> str:
        """'' or a message naming hooks the plugin implements that do not exist."""
        known = set(REGISTRATION_HOOKS.values()) | {
            "register_domains",
            "run_started",
            "record_written",
            "run_finished",
        }
        names = []
        for attr in dir(plugin):
            value = getattr(plugin, attr, None)
            if (
                callable(value)
                and hasattr(value, f"{GROUP}_impl")
                and attr not in known
            ):
                names.append(f"unknown hook '{attr}'{closest(attr, known)}")
        return "; ".join(names)

    def _fail(self, name: str, module: str, error: str) -> None:
        if self.strict:
            raise PluginError(f"plugin '{name}' ({module}) failed to load: {error}")
        log.warning(
            "plugin '%s' (%s) failed to load and is skipped: %s", name, module, error
        )
        self.failures.append(LoadFailure(name, module, error))

    # --- collecting --------------------------------------------------------------

    def _offers(self, name: str, plugin: object) -> list[tuple[str, object]]:
        """Call one plugin's registration hooks and check what it offers."""
        offered: list[tuple[str, object]] = []
        hooks = dict(REGISTRATION_HOOKS, domain="register_domains")
        for stage, hook_name in hooks.items():
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            for impl in (i for i in impls if i.plugin is plugin):

                def register(item, _stage=stage):
                    offered.append((_stage, self._check(_stage, item)))

                impl.function(register=register)
        return offered

    def _check(self, stage: str, item):
        if stage == "domain":
            import tomllib

            path = Path(item)
            if not (path / "pack.toml").is_file():
                raise PluginError(f"registered {path}, which has no pack.toml")
            with open(path / "pack.toml", "rb") as fh:
                return tomllib.load(fh).get("name", path.name), path
        if not (isinstance(item, type) and issubclass(item, Component)):
            raise PluginError(
                f"registered {item!r} as a {stage}; expected a chatroom component class"
            )
        if item.stage != stage:
            raise PluginError(f"registered '{item.name}' ({item.stage}) as a {stage}")
        if not item.name:
            raise PluginError(f"registered {item.__name__} without a name")
        return item

    # --- lookup ------------------------------------------------------------------

    def component(self, stage: str, name: str) -> type[Component]:
        known = self.components[stage]
        if name not in known:
            hint = (
                closest(name, known)
                or f" (known: {', '.join(sorted(known)) or 'none'})"
            )
            raise PluginError(f"unknown {stage} '{name}'{hint}")
        return known[name]

    def owner(self, stage: str, name: str) -> str:
        return self.owners.get(f"{stage}:{name}", "")

    @property
    def hook(self):
        return self.pm.hook
