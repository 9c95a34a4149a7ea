"""Testing helpers for controller authors: `check_controller(name)` (conformance checks) and
hypothesis strategies (`palsctl.testing.strategies`). Needs the ``test`` extra (hypothesis)."""
from __future__ import annotations


def check_controller(name: str, **kwargs):
    """Run the conformance checks on a registered controller (see `palsctl.testing.checks`)."""
    from palsctl.testing.checks import check_controller as _check

    return _check(name, **kwargs)


__all__ = ["check_controller"]
