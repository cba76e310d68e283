"""Typed registries: one per kind of spec, filled by the plugins' register hooks."""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Generic, TypeVar

import attrs

from vistune import specs
from vistune.errors import RegistryError

T = TypeVar("T")


@attrs.frozen
class Owner:
    """Who registered a spec: the plugin (entry-point) name and its distribution."""

    plugin: str
    distribution: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} (distribution {self.distribution!r})"


class Registry(Generic[T]):
    """Named specs of one kind.  A name registered twice is an error naming both owners."""

    def __init__(self, kind: str, spec_type: type[T]):
        self.kind = kind
        self.spec_type = spec_type
        self._entries: dict[str, tuple[T, Owner]] = {}
        #: name -> every (spec, owner) that claimed it, while more than one does
        self._conflicts: dict[str, list[tuple[T, Owner]]] = {}

    def add(self, spec: T, owner: Owner) -> None:
        if not isinstance(spec, self.spec_type):
            raise RegistryError(
                f"{owner} registered {spec!r} as a {self.kind} entry; expected a {self.spec_type.__module__}."
                f"{self.spec_type.__qualname__}"
            )
        try:
            attrs.validate(spec)  # specs are validated at construction; this catches ones mutated or forged since
        except (TypeError, ValueError) as exc:
            raise RegistryError(f"{owner} registered an invalid {self.kind} entry {spec!r}: {exc}") from None
        name = spec.name  # type: ignore[attr-defined]
        if name in self._entries:
            first = self._entries[name][1]
            self._conflicts.setdefault(name, [self._entries[name]]).append((spec, owner))
            raise RegistryError(
                f"{self.kind} {name!r} is registered twice: by {first} and by {owner}",
                hint="uninstall one of the two distributions, or block one plugin with VISTUNE_BLOCK_PLUGINS",
            )
        self._entries[name] = (spec, owner)

    def remove_owner(self, plugin: str) -> None:
        """Forget everything one plugin registered (used when the plugin is unloaded)."""
        for name in [n for n, (_, o) in self._entries.items() if o.plugin == plugin]:
            del self._entries[name]
        for name, claims in list(self._conflicts.items()):
            claims[:] = [claim for claim in claims if claim[1].plugin != plugin]
            if len(claims) < 2:
                del self._conflicts[name]
                if claims and name not in self._entries:  # the remaining claimant gets the name
                    self._entries[name] = claims[0]

    def get(self, name: str) -> T:
        if name in self._conflicts:
            owners = " and ".join(str(owner) for _, owner in self._conflicts[name])
            raise RegistryError(
                f"{self.kind} {name!r} is ambiguous: registered by {owners}",
                hint="uninstall one of them or block one with VISTUNE_BLOCK_PLUGINS",
            )
        try:
            return self._entries[name][0]
        except KeyError:
            raise RegistryError(self.unknown_message(name), hint=f"`vistune list {self.kind}` shows them all") from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self.names(), n=3, cutoff=0.6)
        message = f"unknown {self.kind} {name!r}"
        if close:
            message += f" (did you mean {' or '.join(repr(c) for c in close)}?)"
        elif self.names():
            message += f"; registered: {', '.join(self.names())}"
        else:
            message += f"; no plugin registers any {self.kind}"
        return message

    def owner(self, name: str) -> Owner:
        return self._entries[name][1]

    def claimants(self, name: str) -> list[Owner]:
        """Every owner that registered ``name``: more than one makes it ambiguous (unusable)."""
        return [owner for _, owner in self._conflicts.get(name, [])]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return (self._entries[n][0] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)


#: The kinds, in the order `vistune list` and `vistune plugins` show them, with the hook
#: that fills each and the spec classes that hook may register.
KINDS: dict[str, tuple[str, type]] = {
    "models": ("vistune_register_models", specs.ModelType),
    "checkpoints": ("vistune_register_models", specs.ModelAlias),
    "templates": ("vistune_register_templates", specs.Template),
    "adapters": ("vistune_register_adapters", specs.Adapter),
    "algorithms": ("vistune_register_algorithms", specs.Algorithm),
    "rewards": ("vistune_register_rewards", specs.Reward),
    "backends": ("vistune_register_backends", specs.Backend),
    "datasets": ("vistune_register_datasets", specs.Dataset),
    "formats": ("vistune_register_data_formats", specs.DataFormat),
}


class Registries:
    """All registries of one plugin manager, by kind."""

    def __init__(self) -> None:
        self.by_kind: dict[str, Registry] = {kind: Registry(kind, spec) for kind, (_, spec) in KINDS.items()}

    def __getattr__(self, kind: str) -> Registry:
        """``registries.models`` and the like.  ``__dict__`` and not ``self.by_kind``: on an instance that copy or
        pickle has not filled yet, ``self.by_kind`` would call this method again, without end."""
        try:
            return self.__dict__["by_kind"][kind]
        except KeyError:
            raise AttributeError(kind) from None

    def kinds_for_hook(self, hook_name: str) -> list[Registry]:
        return [self.by_kind[kind] for kind, (hook, _) in KINDS.items() if hook == hook_name]

    def add(self, hook_name: str, spec: object, owner: Owner) -> str:
        """Add ``spec`` to the registry of its class among those ``hook_name`` fills; return the kind."""
        candidates = self.kinds_for_hook(hook_name)
        for registry in candidates:
            if isinstance(spec, registry.spec_type):
                registry.add(spec, owner)
                return registry.kind
        allowed = " or ".join(f"vistune.specs.{r.spec_type.__name__}" for r in candidates)
        raise RegistryError(f"{owner} passed {spec!r} to register() in {hook_name}; expected {allowed}")

    def registered_by(self, plugin: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for kind, registry in self.by_kind.items():
            names = [n for n in registry.names() if registry.owner(n).plugin == plugin]
            if names:
                out[kind] = names
        return out

    def remove_owner(self, plugin: str) -> None:
        for registry in self.by_kind.values():
            registry.remove_owner(plugin)
