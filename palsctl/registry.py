"""Name → class registry for controllers and plants, with lazy imports.

>>> register("mine", "mypkg.ctl:MyController")          # doctest: +SKIP
>>> ctl = make_controller("pi", kp_batch=0.5)            # doctest: +SKIP

Third-party packages add controllers through the ``palsctl.controllers`` entry-point group
(and plants through ``palsctl.plants``): ``name = "module:Class"``.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any, cast

from palsctl.errors import UnknownNameError

if TYPE_CHECKING:
    from palsctl.interfaces import Controller, Plant

__all__ = ["available", "builtin", "make_controller", "make_plant", "register", "resolve",
           "unregister"]

_REGISTRY: dict[str, dict[str, str | type]] = {
    "controller": {
        "static": "palsctl.controllers.baselines:StaticController",
        "cap-to-budget": "palsctl.controllers.baselines:CapToBudgetController",
        "zeus": "palsctl.controllers.baselines:ZeusController",
        "batch-only": "palsctl.controllers.baselines:BatchOnlyController",
        "fixed": "palsctl.controllers.baselines:FixedController",
        "pi": "palsctl.controllers.pi:PIController",
        "mpc": "palsctl.controllers.mpc:MPCController",
        "search": "palsctl.controllers.search:SearchController",
        "cap-only": "palsctl.controllers.cap_only:CapOnlyController",
        "search-truth": "palsctl.controllers.truth:SearchTruthController",
    },
    "plant": {
        "sim": "palsctl.plants.sim:SimPlant",
    },
}
_GROUPS = {"controller": "palsctl.controllers", "plant": "palsctl.plants"}
_BUILTIN = {kind: dict(names) for kind, names in _REGISTRY.items()}
_entry_points_loaded: set[str] = set()


def _check_kind(kind: str) -> None:
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be one of {sorted(_REGISTRY)}, got {kind!r}")


def register(name: str, target: str | type, *, kind: str = "controller") -> None:
    """Register a name for a class or a lazy ``"module:Class"`` path.

    Parameters
    ----------
    name : str
        The name (``make_controller(name)``, ``[controller] name`` of an experiment).
    target : str or type
        The class, or ``"module:Class"`` (imported on first use).
    kind : {"controller", "plant"}
        What the class is.

    See Also
    --------
    unregister : undo a registration (tests that register a controller clean up with it).
    """
    _check_kind(kind)
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"target must look like 'module:Class', got {target!r}")
    _REGISTRY[kind][name] = target


def unregister(name: str, *, kind: str = "controller") -> None:
    """Remove a name `register` added; a built-in name goes back to palsctl's own class.

    Parameters
    ----------
    name : str
        A registered name.
    kind : {"controller", "plant"}
        What the class is.

    Raises
    ------
    UnknownNameError
        When ``name`` is not registered.
    """
    _check_kind(kind)
    _load_entry_points(kind)
    if name not in _REGISTRY[kind]:
        raise UnknownNameError(kind, name, list(_REGISTRY[kind]))
    if name in _BUILTIN[kind]:
        _REGISTRY[kind][name] = _BUILTIN[kind][name]
    else:
        del _REGISTRY[kind][name]


def _load_entry_points(kind: str) -> None:
    if kind in _entry_points_loaded:
        return
    _entry_points_loaded.add(kind)
    for ep in metadata.entry_points(group=_GROUPS[kind]):
        _REGISTRY[kind].setdefault(ep.name, ep.value)


def builtin(kind: str = "controller") -> dict[str, str]:
    """List the names palsctl itself registers for a kind.

    Parameters
    ----------
    kind : {"controller", "plant"}
        What the classes are.

    Returns
    -------
    dict of str to str
        Name -> ``"module:Class"`` path.
    """
    return {name: str(target) for name, target in _BUILTIN[kind].items()}


def available(kind: str = "controller") -> list[str]:
    """List the registered names of a kind (built-in, registered, entry points).

    Parameters
    ----------
    kind : {"controller", "plant"}
        What the classes are.

    Returns
    -------
    list of str
        The names, sorted.
    """
    _load_entry_points(kind)
    return sorted(_REGISTRY[kind])


def resolve(name: str, kind: str = "controller") -> type[Any]:
    """Find the class registered under a name (importing its module on first use).

    Parameters
    ----------
    name : str
        A registered name.
    kind : {"controller", "plant"}
        What the class is.

    Returns
    -------
    type
        The class.

    Raises
    ------
    UnknownNameError
        When ``name`` is not registered (the message lists the known names).
    """
    _load_entry_points(kind)
    try:
        target = _REGISTRY[kind][name]
    except KeyError:
        raise UnknownNameError(kind, name, list(_REGISTRY[kind])) from None
    if isinstance(target, str):
        module_name, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module_name), attr)
        _REGISTRY[kind][name] = target
    return target


def make_controller(name: str, /, **params: Any) -> Controller:
    """Instantiate a registered controller.

    Parameters
    ----------
    name : str
        The controller's registered name (``"pi"``, ``"search"``, ...).
    **params
        Its Config's fields (units in the names); unknown keys raise `ConfigError`.

    Returns
    -------
    Controller
        The controller, not yet bound to a plant.
    """
    return cast("Controller", resolve(name, "controller")(**params))


def make_plant(name: str, /, **params: Any) -> Plant:
    """Instantiate a registered plant.

    Parameters
    ----------
    name : str
        The plant's registered name (``"sim"``).
    **params
        Its constructor's keyword parameters.

    Returns
    -------
    Plant
        The plant.
    """
    return cast("Plant", resolve(name, "plant")(**params))
