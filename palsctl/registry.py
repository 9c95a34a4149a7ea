"""Name → class registry for controllers and plants, with lazy imports.

>>> register("mine", "mypkg.ctl:MyController")          # doctest: +SKIP
>>> ctl = make_controller("pi", kp_batch=0.5)            # doctest: +SKIP

Third-party packages add controllers through the ``palsctl.controllers`` entry-point group
(and plants through ``palsctl.plants``): ``name = "module:Class"``.
"""
from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any

from palsctl.errors import UnknownNameError

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


def register(name: str, target: str | type, *, kind: str = "controller") -> None:
    """Register ``name`` for a class or a lazy ``"module:Class"`` path."""
    if kind not in _REGISTRY:
        raise ValueError(f"kind must be one of {sorted(_REGISTRY)}, got {kind!r}")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"target must look like 'module:Class', got {target!r}")
    _REGISTRY[kind][name] = target


def _load_entry_points(kind: str) -> None:
    if kind in _entry_points_loaded:
        return
    _entry_points_loaded.add(kind)
    for ep in metadata.entry_points(group=_GROUPS[kind]):
        _REGISTRY[kind].setdefault(ep.name, ep.value)


def builtin(kind: str = "controller") -> dict[str, str]:
    """The names palsctl itself registers for a kind, with their ``"module:Class"`` paths."""
    return dict(_BUILTIN[kind])


def available(kind: str = "controller") -> list[str]:
    """Registered names of a kind, sorted."""
    _load_entry_points(kind)
    return sorted(_REGISTRY[kind])


def resolve(name: str, kind: str = "controller") -> type:
    """The class registered under ``name`` (imports its module on first use)."""
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


def make_controller(name: str, /, **params: Any):
    """Instantiate the controller registered as ``name`` with keyword parameters."""
    return resolve(name, "controller")(**params)


def make_plant(name: str, /, **params: Any):
    """Instantiate the plant registered as ``name`` with keyword parameters."""
    return resolve(name, "plant")(**params)
