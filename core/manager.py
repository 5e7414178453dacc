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
        self._collect()

    # --- loading -----------------------------------------------------------------

    def _load_entry_points(self) -> None:
        eps = sorted(metadata.entry_points(group=GROUP), key=lambda e: e.name)
        seen: set[str] = set()
        for ep in eps:
            if ep.name in seen:
                continue
            seen.add(ep.name)
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
            try:
                self.pm.register(module, name=ep.name)
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                if self.pm.is_registered(module):
                    self.pm.unregister(module)
                self._fail(ep.name, ep.value, str(exc))
                continue
            self.infos[ep.name] = info

    def register(self, plugin: object, name: str, version: str = "") -> None:
        """Register an in-process plugin object (tests, notebooks)."""
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin '{name}': {exc}") from None
        self.infos[name] = PluginInfo(name, getattr(plugin, "__name__", name), version, "")
        self._collect_from(name, plugin)

    def _fail(self, name: str, module: str, error: str) -> None:
        if self.strict:
            raise PluginError(f"plugin '{name}' ({module}) failed to load: {error}")
        log.warning("plugin '%s' (%s) failed to load and is skipped: %s", name, module, error)
        self.failures.append(LoadFailure(name, module, error))

    # --- collecting --------------------------------------------------------------

    def _collect(self) -> None:
        for name, plugin in self.pm.list_name_plugin():
            self._collect_from(name, plugin)

    def _collect_from(self, name: str, plugin: object) -> None:
        """Call one plugin's registration hooks; a hook that raises skips the plugin."""
        info = self.infos.get(name)
        module = info.module if info else name
        hooks = dict(REGISTRATION_HOOKS, domain="register_domains")
        for stage, hook_name in hooks.items():
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            for impl in (i for i in impls if i.plugin is plugin):
                if stage == "domain":
                    register = lambda path, _p=name: self._add_domain(path, _p)  # noqa: E731
                else:
                    register = lambda cls, _s=stage, _p=name: self._add_component(  # noqa: E731
                        _s, cls, _p
                    )
                try:
                    impl.function(register=register)
                except PluginError:
                    raise
                except Exception as exc:
                    self._fail(name, module, f"{hook_name}: {type(exc).__name__}: {exc}")

    def _add_domain(self, path, plugin: str) -> None:
        path = Path(path)
        if not (path / "pack.toml").is_file():
            raise PluginError(f"plugin '{plugin}' registered {path}, which has no pack.toml")
        self.domains[path.name] = path
        self.domain_owners[path.name] = plugin
        info = self.infos.get(plugin)
        if info and path.name not in info.domains:
            info.domains.append(path.name)

    def _add_component(self, stage: str, cls: type[Component], plugin: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Component)):
            raise PluginError(
                f"plugin '{plugin}' registered {cls!r} as a {stage}; "
                "expected a chatroom component class"
            )
        if cls.stage != stage:
            raise PluginError(
                f"plugin '{plugin}' registered '{cls.name}' ({cls.stage}) as a {stage}"
            )
        if not cls.name:
            raise PluginError(f"plugin '{plugin}' registered {cls.__name__} without a name")
        self.components[stage][cls.name] = cls
        self.owners[f"{stage}:{cls.name}"] = plugin
        info = self.infos.get(plugin)
        if info:
            info.stages.add(stage)
            info.components.append(f"{stage}:{cls.name}")

    # --- lookup ------------------------------------------------------------------

    def component(self, stage: str, name: str) -> type[Component]:
        known = self.components[stage]
        if name not in known:
            hint = closest(name, known) or f" (known: {', '.join(sorted(known)) or 'none'})"
            raise PluginError(f"unknown {stage} '{name}'{hint}")
        return known[name]

    def owner(self, stage: str, name: str) -> str:
        return self.owners.get(f"{stage}:{name}", "")

    @property
    def hook(self):
        return self.pm.hook
