"""What qubesd's ``PropertyHolder`` is to the app and to each qube: stored values over defaults.

``props`` holds what was set explicitly (``default=False`` on the wire); everything else comes
from the definition's default, computed against the holder. Subclasses say which definitions
apply (``defs``) and how a raw value becomes a typed one (``resolve``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qubes_mcp.sim.qubesd import props as pdefs

_NO_DEFAULT: Any = object()


class PropertyHolder:
    props: dict[str, object]

    @property
    def defs(self) -> Mapping[str, pdefs.PropDef]:
        raise NotImplementedError

    def resolve(self, name: str, value: object) -> Any:
        """A raw value as the typed one (names → objects); identity unless overridden."""
        return value

    def has_prop(self, name: str) -> bool:
        return name in self.defs

    def is_default(self, name: str) -> bool:
        return name not in self.props

    def raw(self, name: str) -> object:
        """The stored or default value without resolving names (raises AttributeError)."""
        if name in self.props:
            return self.props[name]
        prop = self.defs.get(name)
        if prop is None or not prop.has_default or prop.default is None:
            raise AttributeError(name)
        return prop.default(self)

    def get(self, name: str, default: object = _NO_DEFAULT) -> Any:
        """The typed value; ``default`` (if given) instead of AttributeError."""
        try:
            value = self.raw(name)
        except AttributeError:
            if default is _NO_DEFAULT:
                raise
            return default
        return self.resolve(name, value)
