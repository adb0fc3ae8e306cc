"""Registries as objects: a table of entries with a parent it falls back to.

fxprune's extension points (channel rules, layer builders, proof masks, weight views) are
tables keyed by a module type, a function or a name. Each has one *default* instance that the
``register_*`` decorators write to, so a registration made at import time is seen everywhere.
:meth:`Registry.extended` makes a NEW table layered over an existing one: its entries win, every
other key falls back to the parent (including keys the parent learns later), and the parent is
never touched. That is how a test or a user teaches fxprune an op for one call without leaking
global state::

    table = fxprune.rules.DEFAULT_RULES.extended({my_op: my_rule})
    fxprune.prune(model, 0.5, rules=table)

This module sits below every other one (it imports nothing of fxprune).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generic, Hashable, Iterable, Iterator, Mapping, Optional, Tuple, TypeVar, Union

__all__ = ["Registry", "Entries"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
T = TypeVar("T", bound="Registry[Any, Any]")
Entries = Union[Mapping[Any, Any], Iterable[Tuple[Any, Any]], None]

_MISSING = object()


class Registry(Generic[K, V]):
    """A table ``key -> value`` over an optional parent table.

    Lookups try this table's own entries, then the parent's (recursively). Writes go to this
    table only.

    >>> base = Registry("colours", {"sky": "blue"})
    >>> child = base.extended({"grass": "green", "sky": "grey"})
    >>> child["sky"], child["grass"], base.get("grass")
    ('grey', 'green', None)
    >>> base.register("sun")("yellow")  # a later entry of the parent is seen by the child
    'yellow'
    >>> child.get("sun"), sorted(child)
    ('yellow', ['grass', 'sky', 'sun'])
    """

    def __init__(self, name: str, entries: Entries = None, parent: Optional["Registry[K, V]"] = None) -> None:
        self.name = name
        self.parent = parent
        # This table's own entries: the module-level dicts of older code are these objects.
        self.own: Dict[K, V] = {}
        self.update(entries)

    # --- writing
    def update(self, entries: Entries) -> None:
        """Add (or override) entries in this table."""
        if entries is None:
            return
        items = entries.items() if isinstance(entries, Mapping) else entries
        for key, value in items:
            self.own[key] = value

    def register(self, *keys: K) -> Callable[[V], V]:
        """Decorator: register the decorated value for every key (in this table)."""

        def decorate(value: V) -> V:
            for key in keys:
                self.own[key] = value
            return value

        return decorate

    def extended(self: T, entries: Entries = None) -> T:
        """A NEW table with ``entries`` added or overriding; this one is left as it is."""
        child = self._child()
        child.update(entries)
        return child

    def _child(self: T) -> T:
        return type(self)(self.name, parent=self)

    # --- reading
    def get(self, key: Any, default: Any = None) -> Any:
        try:
            found = self.own.get(key, _MISSING)
        except TypeError:  # an unhashable key names nothing
            return default
        if found is not _MISSING:
            return found
        return self.parent.get(key, default) if self.parent is not None else default

    def __getitem__(self, key: K) -> V:
        found = self.get(key, _MISSING)
        if found is _MISSING:
            raise KeyError(key)
        return found

    def __contains__(self, key: Any) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def items(self) -> Iterator[Tuple[K, V]]:
        """Every key and the value it resolves to (own entries first, then the parent's)."""
        seen = set()
        table: Optional[Registry[K, V]] = self
        while table is not None:
            for key, value in list(table.own.items()):
                if key not in seen:
                    seen.add(key)
                    yield key, value
            table = table.parent

    def __iter__(self) -> Iterator[K]:
        return (key for key, _ in self.items())

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def __repr__(self) -> str:
        depth, table = 0, self.parent
        while table is not None:
            depth, table = depth + 1, table.parent
        return f"<{type(self).__name__} {self.name!r}: {len(self.own)} own entries, {depth} parent table(s)>"
