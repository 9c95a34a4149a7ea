"""Testing helpers for controller authors: `check_controller` (conformance checks of a
registered name, a class or an instance) and hypothesis strategies
(`palsctl.testing.strategies`). Needs the ``test`` extra (hypothesis)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from palsctl.interfaces import Controller
    from palsctl.testing.checks import CheckReport

__all__ = ["check_controller"]


def check_controller(controller: str | type[Controller] | Controller,
                     **kwargs: Any) -> CheckReport:
    """Run the conformance checks on a controller (imports hypothesis on first use).

    Parameters
    ----------
    controller : str, Controller subclass or Controller
        A registered name, a class, or an instance (deep-copied for each use).
    **kwargs
        See `palsctl.testing.checks.check_controller` (``model``, ``params``,
        ``plant_kwargs``, ``max_examples``, ``duration_s``, ``cap_tol_w``, ``seed``).

    Returns
    -------
    CheckReport
        What was measured; `AssertionError` names a failed check.
    """
    from palsctl.testing.checks import check_controller as _check

    return _check(controller, **kwargs)
