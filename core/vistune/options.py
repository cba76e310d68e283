"""Plugin options: the settings a plugin declares on its spec, and the values a config gives them.

A plugin declares its settings as :class:`vistune.specs.Option` tuples on its spec;
users set them in a YAML section named after the plugin::

    adapter: lora
    lora:
      rank: 16
      target_modules: all-linear

or on the command line as ``--lora.rank 16``.  A section per plugin, rather than one
``adapter_options`` mapping per kind, because a config can then keep the settings of
several plugins side by side (``--adapter dora`` switches without editing the file, and
the settings of the plugin a run does not use are reported, with their line, instead of
being applied to the wrong one), and because the section's name says whose settings
they are, the way ``rewards: [{name: bleu, options: ...}]`` already does.

The values are checked when the config is read, like core keys: type, choices and
bounds, with the file and line of each key and a "did you mean" for a misspelled one.
An option may keep a flat ``alias`` (``lora_rank``) for configs written before the
option moved into its plugin; a flat key and the section both setting the same option
to different values is an error.  ``algorithm_options`` is the algorithm's section under
its old name, and a reward's section gives defaults that each ``rewards:`` entry's
``options`` override.

Plugins read their values with :func:`option_values` (defaults filled in), so nothing
here imports a plugin, and listing options never imports torch.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from vistune.errors import ConfigError
from vistune.specs import Option

#: Kinds of spec that declare options, and the tasks that use the chosen one of each.
OPTION_KINDS: dict[str, tuple[str, ...]] = {
    "templates": ("sft", "rl", "infer", "serve"),
    "adapters": ("sft", "rl"),
    "datasets": ("sft", "rl", "infer"),
    "algorithms": ("rl",),
    "rewards": ("rl", "infer"),
    "backends": ("rl", "infer", "serve"),
    # the core's quantization schemes (vistune.quantization), which declare options the same way
    "quantization": ("sft", "rl", "infer", "serve"),
}
#: The config key that chooses the plugin of each kind (what ``--help`` and messages name).
CHOOSING_KEY = {"templates": "template", "adapters": "adapter", "datasets": "dataset", "algorithms": "algorithm",
                "rewards": "rewards", "backends": "backend", "quantization": "quantization"}  # fmt: skip


def specs_of(registries: Any, kind: str) -> list[Any]:
    """The specs of one kind that can declare options: a registry's, or the quantization schemes."""
    if kind == "quantization":
        from vistune.quantization import SCHEMES

        return list(SCHEMES.values())
    return list(registries.by_kind[kind])


def option_values(config: Any, plugin: str, declared: Sequence[Option]) -> dict[str, Any]:
    """The values of the options ``declared`` by ``plugin``: the config's, over the declared defaults.

    :param config: the run's :class:`vistune.config.RunConfig` (its ``options`` hold what the
        user set, already checked).
    :param plugin: the plugin's name, which is its section's name.
    :param declared: the plugin's ``options`` (a spec's, or the same tuple its code keeps).
    """
    return values_over_defaults((getattr(config, "options", None) or {}).get(plugin, {}), declared)


def values_over_defaults(given: Mapping[str, Any], declared: Sequence[Option]) -> dict[str, Any]:
    """The values ``given`` for the options ``declared`` (one plugin's section), over their defaults."""
    return {o.name: copy.deepcopy(given[o.name] if o.name in given else o.default) for o in declared}


def spec_option_values(config: Any, spec: Any) -> dict[str, Any]:
    """:func:`option_values` of a registered spec."""
    return option_values(config, spec.name, spec.options)


class Catalog:
    """Every registered plugin that can take options, by section name, and every flat alias."""

    def __init__(self, entries: Iterable[tuple[str, Any]] = ()):
        #: section name -> the (kind, spec) of the plugins of that name (usually one)
        self.plugins: dict[str, list[tuple[str, Any]]] = {}
        #: flat alias -> [(section, option)] it sets
        self.aliases: dict[str, list[tuple[str, Option]]] = {}
        for kind, spec in entries:
            self.plugins.setdefault(spec.name, []).append((kind, spec))
            for option in spec.options:
                if option.alias:
                    self.aliases.setdefault(option.alias, []).append((spec.name, option))

    @classmethod
    def from_registries(cls, registries: Any) -> Catalog:
        return cls((kind, spec) for kind in OPTION_KINDS for spec in specs_of(registries, kind))

    def options(self, section: str) -> dict[str, Option]:
        """The options plugins named ``section`` declare (the first declaration of a name wins)."""
        found: dict[str, Option] = {}
        for _, spec in self.plugins.get(section, ()):
            for option in spec.options:
                found.setdefault(option.name, option)
        return found

    def label(self, section: str) -> str:
        plugins = self.plugins.get(section, ())
        return " / ".join(f"{CHOOSING_KEY[kind]} {spec.name}" for kind, spec in plugins) or section

    def known_keys(self) -> list[str]:
        return [name for name in self.plugins if self.options(name)] + list(self.aliases)


def default_catalog() -> Catalog:
    """The catalog of the process-wide plugin manager (entry points loaded, no torch)."""
    from vistune.plugins import get_plugin_manager

    return Catalog.from_registries(get_plugin_manager().registries)


def close_match(text: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the candidate closest to ``text``, or nothing."""
    close = difflib.get_close_matches(text, list(candidates), n=1, cutoff=0.6) if len(text) < 100 else []
    return f" (did you mean {close[0]}?)" if close else ""


def convert_option(option: Option, value: Any, label: str, where: str) -> Any:
    """Check and convert one value of ``option``; ``label`` names it in messages (``lora.rank``)."""
    from vistune.config import convert_value

    value = convert_value(label, option.type, value, where, nullable=option.default is None, choices=option.choices)
    if option.type in ("int", "float") and value is not None:
        if option.minimum is not None and value < option.minimum:
            raise ConfigError(f"{where}: {label} must be at least {option.minimum:g}, got {value}")
        if option.maximum is not None and value > option.maximum:
            raise ConfigError(f"{where}: {label} must be at most {option.maximum:g}, got {value}")
    return value


@attrs.define
class PluginValues:
    """The plugin options of one config, as the config reader collects them.

    ``values[section][option]`` is what the user set (converted); ``sources`` says where,
    keyed ``"section"``, ``"section.option"`` and, for a flat alias, the alias itself.
    """

    values: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    sources: dict[str, Any] = attrs.field(factory=dict)
    #: flat alias -> sections it set
    aliases: dict[str, list[str]] = attrs.field(factory=dict)
    #: section -> whose it is ("adapter lora"), for messages
    labels: dict[str, str] = attrs.field(factory=dict)
    #: where each (section, option) value came from, to name both sides of a conflict
    _origin: dict[tuple[str, str], str] = attrs.field(factory=dict)

    def set(self, section: str, option: Option, value: Any, shown: str, source: Any, problems: list) -> None:
        key = (section, option.name)
        if key in self._origin and self.values[section][option.name] != value:
            first = self._origin[key]
            problems.append(ConfigError(
                f"{source}: {shown} sets {section}.{option.name} to {value!r}, but {first} sets it to "
                f"{self.values[section][option.name]!r}",
                hint=f"set it once: in the {section} section, or with the flat key {option.alias}"
                if option.alias else "set it once",
            ))  # fmt: skip
            return
        self.values.setdefault(section, {})[option.name] = value
        self._origin.setdefault(key, f"{shown} ({source})")


def collect(
    values: Mapping[str, Any], sources: Mapping[str, Any], default_source: Any, catalog: Catalog,
    is_core_key: Any, problems: list,
) -> tuple[PluginValues, set[str]]:
    """Take the plugin sections, ``section.option`` keys and flat aliases out of a config's values.

    :returns: the collected values and the keys they consumed (the rest are core keys or unknown).
    """
    out = PluginValues()
    consumed: set[str] = set()
    # sections first, then flat aliases, so that a conflict names the alias as the second setting
    ordered = sorted(values, key=lambda k: (not isinstance(values[k], Mapping) and "." not in str(k), str(k)))
    for key in ordered:
        value = values[key]
        text = str(key)
        if is_core_key(text):
            continue
        source = sources.get(key, default_source)
        # --lora.rank 16, or lora.rank: 16 (plugin names may hold dots, option names never do)
        section, dot, name = text.rpartition(".")
        if dot and text not in catalog.plugins:
            if section in catalog.plugins:
                consumed.add(key)
                _set_section(out, catalog, section, {name: value}, sources, source, problems, prefix_source=False)
            continue
        if text in catalog.plugins:
            consumed.add(key)
            out.sources[text] = source
            if not isinstance(value, Mapping):
                problems.append(ConfigError(f"{source}: {text} is the options section of {catalog.label(text)}; "
                                            f"give a mapping, like {text}: {{option: value}}"))  # fmt: skip
                continue
            _set_section(out, catalog, text, value, sources, source, problems)
            continue
        if text in catalog.aliases:
            consumed.add(key)
            out.sources[text] = source
            targets = catalog.aliases[text]
            out.aliases[text] = [section for section, _ in targets]
            out.labels.update((section, catalog.label(section)) for section, _ in targets)
            for section, option in targets:
                try:
                    converted = convert_option(option, value, text, str(source))
                except ConfigError as exc:
                    problems.append(exc)
                    break  # the same message for every plugin sharing the alias
                out.set(section, option, converted, text, source, problems)
    return out, consumed


def _set_section(out: PluginValues, catalog: Catalog, section: str, given: Mapping[str, Any], sources: Mapping,
                 section_source: Any, problems: list, prefix_source: bool = True) -> None:  # fmt: skip
    declared = catalog.options(section)
    out.labels[section] = catalog.label(section)
    for name, value in given.items():
        label = f"{section}.{name}"
        source = sources.get(label, section_source) if prefix_source else section_source
        out.sources.setdefault(label, source)
        option = declared.get(str(name))
        if option is None:
            listed = ", ".join(declared) or "none"
            problems.append(ConfigError(
                f"{source}: {catalog.label(section)} has no option {name!r}{close_match(str(name), declared)}; "
                f"its options: {listed}",
                hint=f"`vistune {_task_hint(catalog, section)} --help` lists every plugin's options",
            ))  # fmt: skip
            continue
        try:
            out.set(section, option, convert_option(option, value, label, str(source)), label, source, problems)
        except ConfigError as exc:
            problems.append(exc)


def _task_hint(catalog: Catalog, section: str) -> str:
    kinds = [kind for kind, _ in catalog.plugins.get(section, ())]
    return OPTION_KINDS[kinds[0]][0] if kinds else "sft"


def merge_algorithm_options(out: PluginValues, catalog: Catalog, algorithm: str, given: Mapping[str, Any],
                            sources: Mapping, source: Any, problems: list) -> None:  # fmt: skip
    """``algorithm_options`` is the chosen algorithm's section under its old name: checked the same way.

    An algorithm that declares no options keeps reading ``algorithm_options`` itself.
    """
    if not given or not catalog.options(algorithm):
        return
    declared = catalog.options(algorithm)
    out.labels[algorithm] = catalog.label(algorithm)
    for name, value in given.items():
        where = sources.get(f"algorithm_options.{name}", source)
        option = declared.get(str(name))
        if option is None:
            problems.append(ConfigError(
                f"{where}: algorithm_options: algorithm {algorithm} has no option {name!r}"
                f"{close_match(str(name), declared)}; its options: {', '.join(declared)}",
            ))  # fmt: skip
            continue
        try:
            converted = convert_option(option, value, f"algorithm_options.{name}", str(where))
        except ConfigError as exc:
            problems.append(exc)
            continue
        out.set(algorithm, option, converted, f"algorithm_options.{name}", where, problems)


def describe(values: Mapping[str, Any]) -> str:
    """``rank=8 alpha=16 target_modules=[q_proj, v_proj]``: option values as the plan prints them."""

    def shown(value: Any) -> str:
        if isinstance(value, list):
            return "[" + ", ".join(map(str, value)) + "]"
        return str(value)

    return " ".join(f"{name}={shown(value)}" for name, value in values.items())


def unused_warnings(loaded: Any, used: set[str]) -> list[str]:
    """Warnings for option sections and flat aliases whose plugins this run does not use."""
    warnings = []
    plugin = loaded.plugin_values
    for section in sorted(plugin.values):
        if section in used:
            continue
        direct = [k for k in plugin.sources if k == section or k.startswith(section + ".")]
        if not direct:
            continue  # set only through flat aliases: reported once, by alias, below
        where = plugin.sources.get(section) or plugin.sources[direct[0]]
        warnings.append(f"{direct[0] if section not in plugin.sources else section} ({where}) sets options of "
                        f"{plugin.labels.get(section, section)}, which this run does not use; they are ignored")  # fmt: skip
    for alias, sections in sorted(plugin.aliases.items()):
        if not set(sections) & used:
            warnings.append(f"{alias} ({plugin.sources[alias]}) sets an option of {', '.join(sections)}, which this run "
                            "does not use; it is ignored")  # fmt: skip
    return warnings


def options_help(registries: Any, task: str) -> str:
    """The plugin options a task can use, for ``vistune <task> --help``."""
    lines = [f"plugin options (a YAML section named after the plugin, e.g. `lora: {{rank: 16}}`, or --lora.rank 16; "
             f"only the chosen plugin's are read):"]  # fmt: skip
    found = False
    for kind, tasks in OPTION_KINDS.items():
        if task not in tasks:
            continue
        for spec in specs_of(registries, kind):
            if not spec.options:
                continue
            found = True
            lines.append(f"  {spec.name} ({CHOOSING_KEY[kind]} {spec.name}):")
            for option in spec.options:
                choices = f" [{'|'.join(map(str, option.choices))}]" if option.choices else ""
                alias = f"; flat key {option.alias}" if option.alias else ""
                default = "-" if option.default is None else option.default
                lines.append(f"    {option.name}{choices}: {option.help} ({option.type}, default {default}{alias})")
    return "\n".join(lines) if found else ""
