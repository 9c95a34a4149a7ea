"""Offline analysis of palsctl's feedback loops (python-control).

* `palsctl.analysis.gains` — `recommend_pi_gains`: the `pi` controller's gains for a plant preset
  or a model's gradients (pure, fast, numpy only; available as
  ``palsctl.analysis.recommend_pi_gains``);
* `palsctl.analysis.plant_model` — the loops' plant model (`FOPDT`) and its exact sampled form;
* `palsctl.analysis.points` — the operating points the loops are analysed at;
* `palsctl.analysis.stability` — discrete plant models (first order + dead time seen through an
  averaging sensor, ZOH at the control period), PI loops, closed-loop poles, gain and phase
  margins (correct with the integrator in the loop), step metrics, stability maps, gain
  recommendation, identification from step data;
* `palsctl.analysis.identify` — step tests on the simulated plant, models from the offline
  power-performance model's gradients;
* `palsctl.analysis.report` — the operating points and report behind ``palsctl analyze``;
* `palsctl.analysis.verify` — closed-loop runs on the simulated plant to check a prediction,
  and empirical closed-loop step tests of any registered controller.

Submodules other than `gains`, `plant_model` and `points` import python-control, scipy and
matplotlib; import them explicitly.
"""
from __future__ import annotations

__all__ = ["recommend_pi_gains", "PIGains"]


def __getattr__(name: str):
    if name in __all__:
        from palsctl.analysis import gains
        return getattr(gains, name)
    raise AttributeError(f"module 'palsctl.analysis' has no attribute {name!r}")
