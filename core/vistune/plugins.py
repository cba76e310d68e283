"""Plugin discovery and loading.

Every plugin, vistune's own defaults included, is found through the ``vistune``
entry-point group and loaded on its own: a plugin that fails to import, implements a
misspelled hook or registers something invalid is reported by name while every other
plugin keeps working.

Environment variables:

``VISTUNE_PLUGINS``
    Comma-separated allow-list of plugin (entry-point) or distribution names.  When
    set, only these plugins load, plus vistune's own default plugins.
``VISTUNE_BLOCK_PLUGINS``
    Comma-separated block-list; it also applies to vistune's own default plugins.
``VISTUNE_STRICT_PLUGINS``
    ``1`` turns every plugin problem into an immediate error (for plugin developers).
``VISTUNE_TRACE_HOOKS``
    ``1`` prints every hook call and its result to stderr.
``VISTUNE_DEBUG_PLUGINS``
    ``1`` prints the full traceback of every plugin problem to stderr.

Names in the allow- and block-lists match an entry-point name or a distribution name;
distribution names are compared in their normalised form (``Vistune_LLaVA`` ==
``vistune-llava``).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import inspect
import os
import re
import sys
import traceback
from typing import Any

import attrs
import pluggy

from vistune import ENTRY_POINT_GROUP, HOOK_API_VERSION, hookspecs
from vistune.errors import PluginError, VistuneError
from vistune.registry import KINDS, Owner, Registries

CORE_DISTRIBUTION = "vistune"
REGISTRATION_HOOKS = tuple(dict.fromkeys(hook for hook, _ in KINDS.values()))


def normalize_name(name: str) -> str:
    """PEP 503 normal form, so that allow/block lists match however a distribution is spelled."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_list(name: str) -> set[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return {normalize_name(part.strip()) for part in value.split(",") if part.strip()}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def strict_mode() -> bool:
    return _env_flag("VISTUNE_STRICT_PLUGINS")


@attrs.define
class PluginInfo:
    """What ``vistune plugins`` reports for one plugin."""

    name: str
    distribution: str
    version: str
    hooks: list[str] = attrs.field(factory=list)
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    errors: list[str] = attrs.field(factory=list)
    loaded: bool = True

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


class PluginManager:
    """The pluggy manager, the registries it fills and a report per plugin."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.registries = Registries()
        self.infos: dict[str, PluginInfo] = {}
        self.tracing = _env_flag("VISTUNE_TRACE_HOOKS")
        if self.tracing:
            self.pm.trace.root.setwriter(sys.stderr.write)
            self.pm.enable_tracing()

    @property
    def hook(self):
        return self.pm.hook

    # -- discovery -----------------------------------------------------------

    def load_entry_points(self) -> None:
        allow = _env_list("VISTUNE_PLUGINS")
        block = _env_list("VISTUNE_BLOCK_PLUGINS") or set()

        def order(ep: importlib.metadata.EntryPoint) -> tuple[str, bool]:
            # vistune's own plugin wins a tie on the entry-point name; the other one is reported
            return ep.name, not (ep.dist and normalize_name(ep.dist.name) == CORE_DISTRIBUTION)

        added: list[tuple[Any, PluginInfo]] = []
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=order):
            dist = ep.dist.name if ep.dist else "(unknown)"
            version = ep.dist.version if ep.dist else ""
            names = {normalize_name(ep.name), normalize_name(dist)}
            if names & block:
                continue
            if allow is not None and normalize_name(dist) != CORE_DISTRIBUTION and not (names & allow):
                continue
            if ep.name in self.infos:
                # Two distributions chose the same entry-point name: keep the first, report the second.
                first = self.infos[ep.name].distribution
                info = PluginInfo(ep.name, dist, version, loaded=False)
                self.infos[f"{ep.name} ({dist})"] = info
                self._fail(info, f"is not loaded: distribution {first!r} already provides a plugin named {ep.name!r}",
                           hint="rename one of the entry points, or block one with VISTUNE_BLOCK_PLUGINS")  # fmt: skip
                continue
            loaded = self._load_entry_point(ep, dist, version)
            if loaded:
                added.append(loaded)
        # every plugin is known to pluggy before any registers: tryfirst, trylast and hook wrappers then apply
        self._call_registration_hooks(added)
        self.check_references()

    def check_references(self) -> None:
        """Report specs that name what no loaded plugin registers (an alias's model type, a default template,
        a dataset's format)."""
        registries = self.registries
        for alias in registries.checkpoints:
            if alias.model_type not in registries.models:
                self._fail_spec(registries.checkpoints.owner(alias.name).plugin,
                                f"registers checkpoint {alias.name!r} of model type {alias.model_type!r}, "
                                f"which no loaded plugin registers")  # fmt: skip
        for dataset in registries.datasets:
            if dataset.format != "records" and dataset.format not in registries.formats:
                self._fail_spec(registries.datasets.owner(dataset.name).plugin,
                                f"registers dataset {dataset.name!r} in the data format {dataset.format!r}, "
                                f"which no loaded plugin registers")  # fmt: skip
        for model_type in registries.models:
            if model_type.default_template not in registries.templates:
                self._fail_spec(registries.models.owner(model_type.name).plugin,
                                f"registers model type {model_type.name!r} whose default template "
                                f"{model_type.default_template!r} no loaded plugin registers")  # fmt: skip

    def _fail_spec(self, plugin: str, what: str) -> None:
        self._fail(self.infos[plugin], what, hint="install the plugin that provides it, or fix the name")

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint, dist: str, version: str) -> tuple[Any, PluginInfo] | None:
        try:
            plugin = ep.load()
        except Exception as exc:  # any import error must not take the others down
            info = PluginInfo(ep.name, dist, version, loaded=False)
            self.infos[ep.name] = info
            self._fail(info, f"failed to import ({ep.value})", exc)
            return None
        info = self._register(plugin, name=ep.name, distribution=dist, version=version)
        return (plugin, info) if info.loaded else None

    # -- registration --------------------------------------------------------

    def add_plugin(self, plugin: Any, name: str, distribution: str = "(local)", version: str = "") -> PluginInfo:
        """Register one plugin object and call its registration hooks, in isolation from the others."""
        info = self._register(plugin, name, distribution, version)
        if info.loaded:
            self._call_registration_hooks([(plugin, info)])
        return info

    def _register(self, plugin: Any, name: str, distribution: str, version: str) -> PluginInfo:
        """Register ``plugin`` with pluggy after checking its hook API and hook implementations."""
        info = PluginInfo(name, distribution, version)
        if name in self.infos:
            raise PluginError(f"a plugin named {name!r} is already loaded (from {self.infos[name].distribution!r})")
        self.infos[name] = info
        wanted = getattr(plugin, "VISTUNE_HOOK_API", HOOK_API_VERSION)
        if not isinstance(wanted, int) or wanted > HOOK_API_VERSION:
            info.loaded = False
            self._fail(
                info,
                f"needs hook API {wanted!r} but this vistune provides {HOOK_API_VERSION}",
                hint="upgrade vistune or install an older release of the plugin",
            )
            return info
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            info.loaded = False
            self._fail(info, "has an invalid hook implementation", exc, hint=_known_hooks_hint(plugin))
            return info
        info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
        for attr in dir(plugin):
            if attr.startswith("vistune_") and attr not in info.hooks and callable(getattr(plugin, attr, None)):
                self._fail(info, f"defines {attr}() without the @vistune.hookimpl decorator, so it is ignored",
                           hint="decorate it with @vistune.hookimpl")  # fmt: skip
        return info

    def _call_registration_hooks(self, added: list[tuple[Any, PluginInfo]]) -> None:
        """Call every registration hook of the newly ``added`` plugins through pluggy.

        Each plugin's implementation is called on its own, through a pluggy hook caller
        that leaves out every other plugin's implementation (hook wrappers stay in): one
        plugin's exception then stops only that plugin, and names it, while pluggy still
        orders the calls (``tryfirst`` / ``trylast``, else the plugin registered last
        first), runs the hook wrappers around each call, and traces each call with its
        arguments (``VISTUNE_TRACE_HOOKS``).  ``register`` knows whose spec it receives.
        """
        infos = {id(plugin): info for plugin, info in added}
        for hook_name in REGISTRATION_HOOKS:
            impls = getattr(self.pm.hook, hook_name).get_hookimpls()
            plain = [impl for impl in impls if not (impl.wrapper or impl.hookwrapper)]
            for impl in reversed(plain):  # the order pluggy calls them in
                info = infos.get(id(impl.plugin))
                if info is None:
                    continue  # registered earlier: its specs are in the registries already
                caller = self.pm.subset_hook_caller(hook_name, [other.plugin for other in plain if other is not impl])
                try:
                    caller(register=Register(self, hook_name, info))
                except Exception as exc:
                    if isinstance(exc, PluginError) and strict_mode():  # raised by _fail in register(): names the plugin
                        raise
                    culprit = self._culprit(exc, impls) or info
                    self._fail(culprit, f"raised in {hook_name}" + ("" if culprit is info else
                               f" (a hook wrapper, while plugin {info.name!r} registered)"), exc)  # fmt: skip
        for _, info in added:
            info.registered = self.registries.registered_by(info.name)

    def _culprit(self, exc: BaseException, impls: list[Any]) -> PluginInfo | None:
        """The plugin whose hook implementation raised ``exc``: the innermost of its frames in the traceback."""
        codes = {}
        for impl in impls:
            code = getattr(getattr(impl.function, "__func__", impl.function), "__code__", None)
            if code is not None and impl.plugin_name in self.infos:
                codes[code] = self.infos[impl.plugin_name]
        found = None
        tb = exc.__traceback__
        while tb is not None:
            found = codes.get(tb.tb_frame.f_code, found)
            tb = tb.tb_next
        return found

    def remove_plugin(self, name: str) -> None:
        """Unregister a plugin and forget what it registered."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.registries.remove_owner(name)
        self.infos.pop(name, None)

    def _fail(self, info: PluginInfo, what: str, exc: BaseException | None = None, hint: str | None = None) -> None:
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        message = f"plugin {info.name!r} from distribution {info.distribution!r} {what}{detail}"
        if strict_mode():
            raise PluginError(message, hint=hint) from exc
        info.errors.append(message if not hint else f"{message} (hint: {hint})")
        if _env_flag("VISTUNE_DEBUG_PLUGINS") and exc is not None:
            traceback.print_exception(exc)

    def errors(self) -> list[str]:
        return [error for info in self.infos.values() for error in info.errors]


class Register:
    """The ``register`` argument of a registration hook: adds specs to the registries in the plugin's name.

    Its ``repr`` names the plugin, so that a traced hook call (``VISTUNE_TRACE_HOOKS``)
    says whose registration it is.
    """

    def __init__(self, manager: PluginManager, hook_name: str, info: PluginInfo) -> None:
        self.manager, self.hook_name, self.info = manager, hook_name, info

    def __call__(self, spec: Any) -> None:
        try:
            self.manager.registries.add(self.hook_name, spec, Owner(self.info.name, self.info.distribution))
        except VistuneError as exc:
            self.manager._fail(self.info, f"could not register a spec in {self.hook_name}", exc)

    def __repr__(self) -> str:
        return f"<register for plugin {self.info.name!r} ({self.info.distribution})>"


def hook_names() -> list[str]:
    """Every hook a plugin can implement."""
    return sorted(n for n in dir(hookspecs) if n.startswith("vistune_"))


def _known_hooks_hint(plugin: Any) -> str:
    """What is wrong with a plugin's hook implementations: an argument a hook does not take, or a misspelt hook."""
    names = hook_names()
    for attr in (a for a in dir(plugin) if a in names):
        taken = list(inspect.signature(getattr(hookspecs, attr)).parameters)
        try:
            asked = list(inspect.signature(getattr(plugin, attr)).parameters)
        except (TypeError, ValueError):
            continue
        wrong = [arg for arg in asked if arg not in taken and arg != "self"]
        if wrong:
            return f"{attr} takes {', '.join(taken) or 'no arguments'}; {', '.join(wrong)} is not one of them"
    unknown = [a for a in dir(plugin) if a.startswith("vistune_") and a not in names]
    for attr in unknown:
        close = difflib.get_close_matches(attr, names, n=1)
        if close:
            return f"{attr} is not a vistune hook; did you mean {close[0]}?"
    return "known hooks: " + ", ".join(names)


_manager: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, loading the entry points on first use."""
    global _manager
    if _manager is None:
        manager = PluginManager()
        manager.load_entry_points()  # may raise (VISTUNE_STRICT_PLUGINS): cache only a fully loaded manager
        _manager = manager
    return _manager
