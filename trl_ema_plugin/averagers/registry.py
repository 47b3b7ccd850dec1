"""Name → averager class. Third parties register more through the entry-point group
``trl_ema_plugin.averagers`` (value ``module:Class``, a subclass of :class:`Averager` that declares its
``hyperparameters``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Averager

ENTRY_POINT_GROUP = "trl_ema_plugin.averagers"
_REGISTRY: dict[str, type[Averager]] = {}
_entry_points_loaded = False


def register_averager(name: str) -> Callable[[type[Averager]], type[Averager]]:
    """Class decorator: make ``name`` usable as ``method=name``."""

    def decorate(cls: type[Averager]) -> type[Averager]:
        check_declaration(cls)
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"averager method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.method = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def check_declaration(cls: type[Averager]) -> None:
    """An averager declares the keyword arguments users may set (``hyperparameters``), and takes them.

    The declaration, not the constructor's signature, decides which settings exist, so that a new constructor
    argument never becomes a setting by accident.
    """
    declared = getattr(cls, "hyperparameters", None)
    if not (isinstance(declared, tuple) and all(isinstance(n, str) and n.isidentifier() for n in declared)):
        raise ValueError(
            f"{cls.__qualname__} declares no hyperparameters: add the class attribute "
            "hyperparameters = (...), the names of the keyword arguments users may set (() for none)"
        )
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    missing = [n for n in declared if n not in params or params[n].kind is params[n].POSITIONAL_ONLY]
    if missing:
        raise ValueError(
            f"{cls.__qualname__} declares hyperparameters its constructor does not take: {', '.join(missing)}"
        )


def _load_entry_points() -> None:
    """Register every installed third-party averager once; a broken one is an error that names it."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    from .base import Averager

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP})"
        try:
            cls = ep.load()
        except Exception as exc:
            raise ValueError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Averager)):
            raise ValueError(f"{where} is not a subclass of trl_ema_plugin.Averager")
        try:
            register_averager(ep.name)(cls)  # refuses a name taken by another class
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    _entry_points_loaded = True


def registered_methods() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def averager_class(method: str) -> type[Averager]:
    _load_entry_points()
    try:
        return _REGISTRY[method]
    except KeyError:
        raise ValueError(
            f"method={method!r}: not a registered averager (allowed: {' | '.join(registered_methods())})"
        ) from None


def hyperparameter_names(method: str) -> tuple[str, ...]:
    """The settings that ``method`` declares (its class attribute ``hyperparameters``)."""
    return averager_class(method).hyperparameters
