"""The strategy registry: names to classes, duplicates rejected, misses list what exists."""

from __future__ import annotations

from memtrain.errors import StrategyError
from memtrain.strategies.base import Strategy

_REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator adding a strategy under ``cls.name``; a second class with that name is an error."""
    name = getattr(cls, "name", None)
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__} has no strategy name")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"strategy name {name!r} is already registered by {_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}")
    for attr in ("stage", "summary"):
        if not hasattr(cls, attr):
            raise TypeError(f"strategy {name!r} must define {attr!r}")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def registered() -> dict[str, type[Strategy]]:
    return dict(_REGISTRY)


def create(spec: str) -> Strategy:
    """Instantiate ``name`` or ``name:variant``; StrategyError naming the choices on a miss."""
    text = spec.strip()
    name, _, variant = text.partition(":")
    name = name.strip().lower()
    variant = variant.strip().lower() or None
    if name not in _REGISTRY:
        raise StrategyError(f"--strategies: unknown strategy '{text}' (available: {', '.join(available())})")
    cls = _REGISTRY[name]
    if variant is not None and not cls.accepts_variant(variant):
        raise StrategyError(cls.variant_error(text))
    return cls(variant)
