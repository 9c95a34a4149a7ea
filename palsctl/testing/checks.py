"""Conformance checks every controller must pass: `check_controller`.

The controller is a registered name, a `Controller` subclass or an instance (deep-copied for
each use, so its configuration and model are kept and the instance itself is not touched).

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

import copy
import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from palsctl.errors import ConfigError
from palsctl.interfaces import Controller
from palsctl.registry import resolve
from palsctl.types import Action, Limits, Measurement, Request, Setpoint

if TYPE_CHECKING:
    from palsctl.loop import RunRecord
    from palsctl.plants.sim import SimPlant

__all__ = ["CheckReport", "ConstantStream", "check_controller"]


class ConstantStream:
    """Requests arriving at a constant rate with fixed prompt/output lengths (deterministic).

    Parameters
    ----------
    rate_req_s : float
        Arrivals per second (req/s), evenly spaced.
    prompt_tokens, output_tokens : int, default 512 and 256
        Every request's prompt length and tokens to generate.
    """

    def __init__(self, rate_req_s: float, prompt_tokens: int = 512, output_tokens: int = 256):
        self.rate_req_s, self.prompt, self.output = rate_req_s, prompt_tokens, output_tokens
        self.mean_prompt_tokens = float(prompt_tokens)
        self.mean_output_tokens = float(output_tokens)

    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        """List the requests arriving in ``[t0_s, t1_s)`` (seconds since the start)."""
        k0 = math.ceil(t0_s * self.rate_req_s - 1e-9)
        k1 = math.ceil(t1_s * self.rate_req_s - 1e-9)
        return [Request(request_id=k, arrival_s=k / self.rate_req_s, prompt_tokens=self.prompt,
                        output_tokens=self.output) for k in range(k0, k1)]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckReport:
    """What `check_controller` measured; it raises `AssertionError` when a check fails.

    The settling run is a closed loop on a constant setpoint whose request stream offers exactly
    the throughput target; its "tail" is its last third.

    Parameters
    ----------
    name : str
        The controller checked (its registered name or its class's name).
    examples : int
        (measurement, setpoint) examples the limits and budget checks ran.
    cap_span_w : float
        Span of the applied per-GPU cap over the tail, W.
    cap_tol_w : float
        The largest span allowed, W.
    batch_span : int
        Span of the applied batch limit over the tail.
    batch_tol : int
        The largest span allowed (one batch step: ``max(1, 13 %)``).
    target_tok_s : float
        Throughput target of the settling run (the offered load), tok/s.
    throughput_tok_s : float
        Mean generated throughput over the tail, tok/s.
    power_budget_w : float
        Power budget of the settling run (all GPUs), W.
    power_w : float
        Mean measured power over the tail (all GPUs), W.
    final_action : Action
        The action applied in the last step.
    """

    name: str
    examples: int
    cap_span_w: float
    cap_tol_w: float
    batch_span: int
    batch_tol: int
    target_tok_s: float
    throughput_tok_s: float
    power_budget_w: float
    power_w: float
    final_action: Action


def _resolve(controller: str | type[Controller] | Controller) -> tuple[str, type[Controller]]:
    """The name and class of what `check_controller` got."""
    if isinstance(controller, Controller):
        return type(controller).name, type(controller)
    if isinstance(controller, str):
        return controller, cast("type[Controller]", resolve(controller))
    if isinstance(controller, type) and issubclass(controller, Controller):
        return controller.name, controller
    raise TypeError("check_controller needs a registered name, a Controller class or a "
                    f"Controller instance, got {controller!r}")


def _maker(controller: str | type[Controller] | Controller, cls: type[Controller], model: Any,
           params: dict[str, Any]) -> Callable[[], Controller]:
    """Make fresh controllers: from the class and ``params``, or deep copies of an instance."""
    if isinstance(controller, Controller):
        if params:
            raise TypeError("params cannot be given with a controller instance (its config is "
                            "used)")
        instance = controller

        def copied() -> Controller:
            c = copy.deepcopy(instance)
            if c.needs_model and getattr(c, "model", None) is None and model is not None:
                setattr(c, "model", model)  # noqa: B010 - not every Controller has one
            return c

        return copied

    def make() -> Controller:
        if cls.needs_model and model is not None:
            return cls(model=model, **params)
        return cls(**params)

    return make


def _within(a: Action, lim: Limits) -> bool:
    ok = True
    if a.power_cap_w is not None:
        ok &= math.isfinite(a.power_cap_w) and \
            lim.power_cap_min_w - 1e-9 <= a.power_cap_w <= lim.power_cap_max_w + 1e-9
    if a.max_batch is not None:
        ok &= isinstance(a.max_batch, int) and lim.max_batch_min <= a.max_batch <= lim.max_batch_max
    return bool(ok)


def _plant(plant_kwargs: dict[str, Any], seed: int) -> SimPlant:
    from palsctl.plants.sim import SimPlant

    return SimPlant(**{**plant_kwargs, "seed": seed})


def _closed_loop(make: Callable[[], Controller], plant_kwargs: dict[str, Any],
                 setpoint: Setpoint, rate_req_s: float, duration_s: float,
                 seed: int) -> RunRecord:
    from palsctl.loop import run_loop

    plant = _plant(plant_kwargs, seed)
    return run_loop(plant, make(), duration_s=duration_s, schedule=lambda t: setpoint,
                    workload=ConstantStream(rate_req_s))


def check_controller(controller: str | type[Controller] | Controller, *, model: Any = None,
                     params: dict[str, Any] | None = None,
                     plant_kwargs: dict[str, Any] | None = None, max_examples: int = 40,
                     duration_s: float = 240.0, cap_tol_w: float = 10.0,
                     seed: int = 0) -> CheckReport:
    """Run the conformance checks on a controller (the module docstring lists them).

    Parameters
    ----------
    controller : str, Controller subclass or Controller
        A registered name, a class, or an instance (deep-copied for each use: its config and
        model are kept; ``params`` must then be empty).
    model : PowerPerfModel, optional
        Offline model for a model-based controller (default: profiled for the plant).
    params : dict, optional
        Config fields for a name or a class.
    plant_kwargs : dict, optional
        The simulated plant used (default: mixtral-8x7b on 4 × A100-80GB).
    max_examples : int, default 40
        Hypothesis examples of the limits and budget checks.
    duration_s : float, default 240.0
        Length of each closed-loop run, s.
    cap_tol_w : float, default 10.0
        Largest span of the cap over the last third of the settling run, W.
    seed : int, default 0
        Seed of the simulated plant.

    Returns
    -------
    CheckReport
        What was measured.

    Raises
    ------
    AssertionError
        Naming the check that failed.
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
    name, cls = _resolve(controller)
    if cls.needs_model and model is None and getattr(controller, "model", None) is None:
        model = model_for(info)
    make = _maker(controller, cls, model, params)

    # 1. config
    cfg_cls = cls.Config
    params_ = getattr(cfg_cls, "__dataclass_params__", None)
    assert dataclasses.is_dataclass(cfg_cls) and params_ is not None and params_.frozen, \
        f"{name}: Config must be a frozen dataclass"
    try:
        cls(no_such_parameter_xyz=1)
    except ConfigError:
        pass
    else:  # pragma: no cover - a failing controller
        raise AssertionError(f"{name}: an unknown config key must raise ConfigError")

    # 2. limits, 3. budget (hypothesis over measurements and setpoints)
    ctl = make()
    ctl.setup(limits=lim, dt_s=dt, plant_info=info)
    guard = SafetyGuard(make())
    guard.setup(limits=lim, dt_s=dt, plant_info=info)
    cfg = settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                   suppress_health_check=list(HealthCheck))
    examples = 0

    @cfg
    @given(m=S.measurements(lim), sp=S.setpoints(lim))
    def limits_and_budget(m: Measurement, sp: Setpoint) -> None:
        nonlocal examples
        examples += 1
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
    r1 = _closed_loop(make, plant_kwargs, sp, rate, duration_s, seed)
    r2 = _closed_loop(make, plant_kwargs, sp, rate, duration_s, seed)
    a1 = [(s.applied.power_cap_w, s.applied.max_batch) for s in r1.steps]
    a2 = [(s.applied.power_cap_w, s.applied.max_batch) for s in r2.steps]
    assert a1 == a2, f"{name}: not deterministic for a seed"
    tail_steps = r1.steps[len(r1.steps) * 2 // 3:]
    tail = a1[len(a1) * 2 // 3:]
    caps = [c for c, _ in tail if c is not None]
    batches = [b for _, b in tail if b is not None]
    cap_span = (max(caps) - min(caps)) if caps else 0.0
    batch_span = (max(batches) - min(batches)) if batches else 0
    batch_tol = max(1, math.ceil(0.13 * max(batches or [1])))
    assert cap_span <= cap_tol_w + 1e-9, \
        f"{name}: cap still moving by {cap_span:.1f} W in the last third (tolerance {cap_tol_w} W)"
    assert batch_span <= batch_tol, \
        f"{name}: batch still moving by {batch_span} in the last third"
    n_tail = max(1, len(tail_steps))
    return CheckReport(
        name=name, examples=examples, cap_span_w=float(cap_span), cap_tol_w=float(cap_tol_w),
        batch_span=int(batch_span), batch_tol=int(batch_tol), target_tok_s=float(target),
        throughput_tok_s=sum(s.measurement.throughput_tok_s for s in tail_steps) / n_tail,
        power_budget_w=float(sp.power_budget_w or 0.0),
        power_w=sum(s.measurement.power_w for s in tail_steps) / n_tail,
        final_action=r1.steps[-1].applied)
