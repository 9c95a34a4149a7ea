"""Hypothesis strategies for palsctl's core types (for controller and guard property tests).

>>> from palsctl.testing.strategies import measurements      # doctest: +SKIP
>>> @given(measurements(limits))                               # doctest: +SKIP
... def test_finite(m): ...
"""
from __future__ import annotations

from hypothesis import strategies as st

from palsctl.types import Limits, Measurement, Setpoint

__all__ = ["finite", "limits", "measurements", "setpoints"]


def finite(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Finite floats in ``[lo, hi]`` (no NaN, no infinity)."""
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False)


def limits() -> st.SearchStrategy[Limits]:
    """Plausible plant limits: 1–8 GPUs, caps within 50–1000 W, batch limits 1..512."""

    @st.composite
    def build(draw):
        lo = draw(finite(50.0, 300.0))
        hi = draw(finite(lo + 50.0, 1000.0))
        default = draw(finite(lo, hi))
        step = draw(st.sampled_from([1.0, 5.0]))
        bmax = draw(st.integers(8, 512))
        return Limits(power_cap_min_w=lo, power_cap_max_w=hi, power_cap_default_w=default,
                      power_cap_step_w=step, max_batch_min=1, max_batch_max=bmax,
                      num_gpus=draw(st.integers(1, 8)))
    return build()


def measurements(lim: Limits, *, stale: bool | None = False) -> st.SearchStrategy[Measurement]:
    """Any finite, non-negative measurement of a plant with limits ``lim`` (values well beyond
    what the plant can produce included). ``stale=None`` draws the flag too."""
    p_max = lim.power_cap_max_w * lim.num_gpus

    @st.composite
    def build(draw):
        return Measurement(
            t_s=draw(finite(0.0, 1e6)), window_s=draw(finite(0.1, 10.0)),
            power_w=draw(finite(0.0, 3 * p_max)), energy_j=draw(finite(0.0, 1e9)),
            throughput_tok_s=draw(finite(0.0, 1e5)), prompt_tok_s=draw(finite(0.0, 1e6)),
            demand_tok_s=draw(st.none() | finite(0.0, 1e5)),
            running=draw(st.integers(0, 2 * lim.max_batch_max)),
            waiting=draw(st.integers(0, 10_000)), kv_usage=draw(finite(0.0, 1.0)),
            ttft_p90_s=draw(st.none() | finite(0.0, 100.0)),
            tpot_p90_s=draw(st.none() | finite(0.0, 10.0)),
            power_cap_w=draw(st.none() | finite(lim.power_cap_min_w, lim.power_cap_max_w)),
            max_batch=draw(st.none() | st.integers(lim.max_batch_min, lim.max_batch_max)),
            stale=draw(st.booleans()) if stale is None else stale)
    return build()


def setpoints(lim: Limits) -> st.SearchStrategy[Setpoint]:
    """Setpoints with or without target, SLOs, budget (budgets from below the minimum total cap
    to above the maximum)."""
    p_max = lim.power_cap_max_w * lim.num_gpus

    @st.composite
    def build(draw):
        return Setpoint(
            throughput_tok_s=draw(st.none() | finite(0.0, 2e4)),
            tpot_slo_s=draw(st.none() | finite(0.005, 1.0)),
            ttft_slo_s=draw(st.none() | finite(0.1, 30.0)),
            power_budget_w=draw(st.none() | finite(0.5 * lim.power_cap_min_w * lim.num_gpus,
                                                   1.2 * p_max)),
            power_target_w=None)
    return build()
