"""Offline analysis of palsctl's feedback loops (python-control).

* `palsctl.analysis.stability` — discrete plant models (first order + dead time seen through an
  averaging sensor, ZOH at the control period), PI loops, closed-loop poles, gain and phase
  margins (correct with the integrator in the loop), step metrics, stability maps, gain
  recommendation, identification from step data;
* `palsctl.analysis.identify` — step tests on the simulated plant, models from the offline
  power-performance model's gradients;
* `palsctl.analysis.report` — the operating points and report behind ``palsctl analyze``;
* `palsctl.analysis.verify` — closed-loop runs of the `pi` controller on the simulated plant to
  check a prediction.

Submodules import python-control, scipy and matplotlib; import them explicitly.
"""
