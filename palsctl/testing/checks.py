"""Conformance checks every registered controller must pass: `check_controller(name)`.

1. **config** — the Config is a frozen dataclass; an unknown key raises `ConfigError`.
2. **limits** — for any finite measurement and setpoint (hypothesis), the action's knobs are
   finite and within the plant's `Limits` (or None).
3. **budget** — wrapped in the `SafetyGuard`, the total cap (cap × GPUs) never exceeds a budget
   that the minimum caps can meet.
4. **deterministic** — two fresh controllers on two identically seeded closed loops take the same
   actions.
5. **settles** — on a constant setpoint, over the last third of a closed-loop run, the cap spans
   at most ``cap_tol_w`` and the batch at most one batch step (``max(1, 13 %)``): no limit cycle.

The closed loops run the simulated plant (`palsctl.plants.sim.SimPlant`) under a constant-rate
request stream; model-based controllers get a model profiled offline for that plant
(`palsctl.controllers.model_source`) unless ``model=`` is given.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from palsctl.errors import ConfigError
from palsctl.interfaces import Controller
from palsctl.registry import resolve
from palsctl.types import Action, Limits, Request, Setpoint


class ConstantStream:
    """Requests arriving at a constant rate with fixed prompt/output lengths (deterministic)."""

    def __init__(self, rate_req_s: float, prompt_tokens: int = 512, output_tokens: int = 256):
        self.rate_req_s, self.prompt, self.output = rate_req_s, prompt_tokens, output_tokens
        self.mean_prompt_tokens = float(prompt_tokens)
        self.mean_output_tokens = float(output_tokens)

    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        k0 = math.ceil(t0_s * self.rate_req_s - 1e-9)
        k1 = math.ceil(t1_s * self.rate_req_s - 1e-9)
        return [Request(request_id=k, arrival_s=k / self.rate_req_s, prompt_tokens=self.prompt,
                        output_tokens=self.output) for k in range(k0, k1)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckReport:
    """What `check_controller` verified (every field True when it returns)."""

    name: str
    config: bool
    limits: bool
    budget: bool
    deterministic: bool
    settles: bool
    details: dict[str, Any]


def _make(name: str, model: Any, params: dict[str, Any]) -> Controller:
    cls = resolve(name)
    if cls.needs_model and model is not None:
        return cls(model=model, **params)
    return cls(**params)


def _within(a: Action, lim: Limits) -> bool:
    ok = True
    if a.power_cap_w is not None:
        ok &= math.isfinite(a.power_cap_w) and \
            lim.power_cap_min_w - 1e-9 <= a.power_cap_w <= lim.power_cap_max_w + 1e-9
    if a.max_batch is not None:
        ok &= isinstance(a.max_batch, int) and lim.max_batch_min <= a.max_batch <= lim.max_batch_max
    return bool(ok)


def _plant(plant_kwargs: dict[str, Any], seed: int):
    from palsctl.plants.sim import SimPlant

    return SimPlant(**{**plant_kwargs, "seed": seed})


def _closed_loop(name, model, params, plant_kwargs, setpoint, rate_req_s, duration_s, seed):
    from palsctl.loop import run_loop

    plant = _plant(plant_kwargs, seed)
    ctl = _make(name, model, params)
    rec = run_loop(plant, ctl, duration_s=duration_s, schedule=lambda t: setpoint,
                   workload=ConstantStream(rate_req_s))
    return rec


def check_controller(name: str, *, model: Any = None, params: dict[str, Any] | None = None,
                     plant_kwargs: dict[str, Any] | None = None, max_examples: int = 40,
                     duration_s: float = 240.0, cap_tol_w: float = 10.0,
                     seed: int = 0) -> CheckReport:
    """Run the conformance checks on the controller registered as ``name``; raise
    `AssertionError` naming the failed check, else return a `CheckReport`.

    ``plant_kwargs``: the simulated plant used (default: mixtral-8x7b on 4 × A100-80GB).
    ``model``: offline model for model-based controllers (default: profiled for that plant).
    """
    from hypothesis import HealthCheck, given, settings

    from palsctl.controllers.model_source import model_for
    from palsctl.safety import SafetyGuard
    from palsctl.testing import strategies as S

    params = dict(params or {})
    plant_kwargs = dict(plant_kwargs or {"model": "mixtral-8x7b", "gpu": "a100-sxm4-80gb",
                                         "num_gpus": 4})
    probe = _plant(plant_kwargs, seed)
    lim, info, dt = probe.limits, probe.info, probe.dt_s
    info = dataclasses.replace(info, prompt_tokens_mean=info.prompt_tokens_mean or 512.0,
                               output_tokens_mean=info.output_tokens_mean or 256.0)
    cls = resolve(name)
    if cls.needs_model and model is None:
        model = model_for(info)
    details: dict[str, Any] = {}

    # 1. config
    cfg_cls = cls.Config
    assert dataclasses.is_dataclass(cfg_cls) and cfg_cls.__dataclass_params__.frozen, \
        f"{name}: Config must be a frozen dataclass"
    try:
        cls(no_such_parameter_xyz=1)
    except ConfigError:
        pass
    else:  # pragma: no cover - a failing controller
        raise AssertionError(f"{name}: an unknown config key must raise ConfigError")

    # 2. limits, 3. budget (hypothesis over measurements and setpoints)
    ctl = _make(name, model, params)
    ctl.setup(limits=lim, dt_s=dt, plant_info=info)
    guard = SafetyGuard(_make(name, model, params))
    guard.setup(limits=lim, dt_s=dt, plant_info=info)
    cfg = settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))

    @cfg
    @given(m=S.measurements(lim), sp=S.setpoints(lim))
    def limits_and_budget(m, sp):
        a = ctl.step(m, sp)
        assert _within(a, lim), f"{name}: action {a} outside {lim} for {m}, {sp}"
        g = guard.step(m, sp).action
        assert _within(g, lim), f"{name}: guarded action {g} outside limits"
        b = sp.power_budget_w
        if b is not None and b >= lim.power_cap_min_w * lim.num_gpus and g.power_cap_w is not None:
            assert g.power_cap_w * lim.num_gpus <= b + 1e-6, \
                f"{name}: guarded total cap {g.power_cap_w * lim.num_gpus} W > budget {b} W"

    limits_and_budget()

    # 4. deterministic, 5. settles: closed loops on the simulated plant
    from palsctl.plants.sim import steady_state

    full = steady_state(info.model, info.gpu, info.num_gpus, lim.max_batch_max,
                        prompt_tokens=512, output_tokens=256)
    target = 0.5 * full.throughput_tok_s
    sp = Setpoint(throughput_tok_s=target, power_budget_w=0.8 * lim.power_cap_max_w * lim.num_gpus)
    rate = target / 256.0
    r1 = _closed_loop(name, model, params, plant_kwargs, sp, rate, duration_s, seed)
    r2 = _closed_loop(name, model, params, plant_kwargs, sp, rate, duration_s, seed)
    a1 = [(s.applied.power_cap_w, s.applied.max_batch) for s in r1.steps]
    a2 = [(s.applied.power_cap_w, s.applied.max_batch) for s in r2.steps]
    assert a1 == a2, f"{name}: not deterministic for a seed"
    tail = a1[len(a1) * 2 // 3:]
    caps = [c for c, _ in tail if c is not None]
    batches = [b for _, b in tail if b is not None]
    cap_span = (max(caps) - min(caps)) if caps else 0.0
    batch_span = (max(batches) - min(batches)) if batches else 0
    details.update(cap_span_w=cap_span, batch_span=batch_span,
                   final_action=a1[-1], target_tok_s=target)
    assert cap_span <= cap_tol_w + 1e-9, \
        f"{name}: cap still moving by {cap_span:.1f} W in the last third (tolerance {cap_tol_w} W)"
    assert batch_span <= max(1, math.ceil(0.13 * max(batches or [1]))), \
        f"{name}: batch still moving by {batch_span} in the last third"
    return CheckReport(name=name, config=True, limits=True, budget=True, deterministic=True,
                       settles=True, details=details)
