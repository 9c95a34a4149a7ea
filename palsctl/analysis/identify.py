"""Identify the loops' plant models around an operating point: from step tests on a simulated
plant, and from an offline power-performance model's gradients.

The loops of the `pi` controller (``palsctl.controllers.pi``) and what each one sees:

========  =========  ======================================  ================================
loop      knob (u)   measured output (y) the error uses       plant gain
========  =========  ======================================  ================================
budget    cap (W/GPU) total power / N (W per GPU)             dpower_dcap / N
margin    cap (W/GPU) generated throughput (tok/s)            dthroughput_dcap
batch     max_batch  generated throughput (tok/s)             dthroughput_dbatch
========  =========  ======================================  ================================

A step test holds the plant at the operating point with a backlog of requests (the plant is
saturated: throughput is the configuration's capacity, not the offered load), steps one knob
and records the readings; `identify_fopdt` fits gain, lag and dead time with the sensor's
averaging window (the plant's read window, one control period) known.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from palsctl.analysis.stability import FOPDT, identify_fopdt
from palsctl.errors import ConfigError, PalsctlError
from palsctl.interfaces import SimulatedPlant
from palsctl.types import Action, Request

__all__ = ["LOOPS", "LoopSpec", "StepTest", "backlog", "backlog_size", "step_test",
           "identify_from_step_test", "fopdt_from_gradients"]


@dataclass(frozen=True, kw_only=True)
class LoopSpec:
    """One SISO loop: the knob it moves and the output its error is computed from."""

    name: str
    knob: str            # "cap" (W per GPU) or "batch" (sequences)
    output: str          # "power_per_gpu" (W) or "throughput" (tok/s)
    description: str


LOOPS: dict[str, LoopSpec] = {
    "budget": LoopSpec(name="budget", knob="cap", output="power_per_gpu",
                       description="power over budget / power target -> cap"),
    "margin": LoopSpec(name="margin", knob="cap", output="throughput",
                       description="throughput margin -> cap"),
    "batch": LoopSpec(name="batch", knob="batch", output="throughput",
                      description="throughput error -> batch"),
}


def _loop(name: str) -> LoopSpec:
    try:
        return LOOPS[name]
    except KeyError:
        raise ConfigError(f"unknown loop; known: {', '.join(LOOPS)}", key="loop",
                          value=name) from None


@dataclass(frozen=True, kw_only=True)
class StepTest:
    """A recorded step test: ``y[k]`` read at ``t_s[k]``, ``u[k]`` applied right after."""

    loop: str
    t_s: np.ndarray
    u: np.ndarray
    y: np.ndarray
    dt_s: float
    window_s: float
    power_cap_w: float
    max_batch: int


def backlog(n: int, *, prompt_tokens: int, output_tokens: int, seed: int = 0,
            spread: float = 0.5, start_id: int = 0) -> list[Request]:
    """``n`` requests all arriving at t = 0 (a backlog that keeps the plant saturated), with
    lengths drawn uniformly within ±``spread`` of the means (seeded) so that sequences do not
    all finish together."""
    rng = np.random.default_rng(seed)
    lo_p, hi_p = max(1, int(prompt_tokens * (1 - spread))), int(prompt_tokens * (1 + spread)) + 1
    lo_o, hi_o = max(1, int(output_tokens * (1 - spread))), int(output_tokens * (1 + spread)) + 1
    ps = rng.integers(lo_p, hi_p, n)
    os_ = rng.integers(lo_o, hi_o, n)
    return [Request(request_id=start_id + i, arrival_s=0.0, prompt_tokens=int(p),
                    output_tokens=int(o)) for i, (p, o) in enumerate(zip(ps, os_))]


def backlog_size(max_batch: int, duration_s: float, output_tokens: int) -> int:
    """Requests enough to keep ``max_batch`` sequences running for ``duration_s``: a request
    lasts ``output_tokens`` engine steps, taken here as at least 4 ms each, and outputs may be
    50 % shorter than the mean. Step tests check that requests were still waiting at the end."""
    min_request_s = max(0.5 * output_tokens * 4e-3, 1e-3)
    return int(64 + max_batch * (1 + duration_s / min_request_s))


def _read_output(m, output: str, num_gpus: int) -> float:
    return m.power_w / num_gpus if output == "power_per_gpu" else m.throughput_tok_s


def _record(make_plant, spec: LoopSpec, *, power_cap_w: float, max_batch: int, u1: float | None,
            n_warm: int, n_pre: int, n_rec: int, requests) -> tuple[list, list, list, float]:
    plant = make_plant(power_cap_w=power_cap_w, max_batch=max_batch)
    try:
        dt = float(plant.dt_s)
        n_gpus = plant.limits.num_gpus
        plant.submit(requests)
        u0 = float(power_cap_w if spec.knob == "cap" else max_batch)
        for _ in range(n_warm):
            plant.advance(dt)
            plant.read()
        ts, us, ys = [], [], []
        for k in range(n_pre + n_rec):
            plant.advance(dt)
            m = plant.read()
            if m.waiting == 0:
                raise PalsctlError("step test: the backlog ran out (the plant was not "
                                   "saturated); use more requests")
            u = u0 if (u1 is None or k < n_pre - 1) else u1
            if spec.knob == "cap":
                applied = plant.apply(Action(power_cap_w=u)).power_cap_w
            else:
                applied = plant.apply(Action(max_batch=int(u))).max_batch
            ts.append(m.t_s)
            us.append(float(applied))
            ys.append(_read_output(m, spec.output, n_gpus))
    finally:
        plant.close()
    return ts, us, ys, dt


def step_test(make_plant: Callable[..., SimulatedPlant], *, loop: str, power_cap_w: float,
              max_batch: int, step: float, warmup_s: float = 20.0, record_s: float | None = None,
              pre_s: float = 3.0, prompt_tokens: int = 200, output_tokens: int = 400,
              seed: int = 0, paired: bool | None = None) -> StepTest:
    """Run a step test on a fresh plant from ``make_plant(power_cap_w=..., max_batch=...)``.

    The plant gets a backlog large enough for the whole test, runs ``warmup_s`` at the
    operating point, then records ``pre_s`` before and ``record_s`` after stepping the loop's
    knob by ``step`` (W per GPU or sequences).

    ``paired`` (default: for the throughput loops) runs the same deterministic plant a second
    time without the step and records the *difference* (plus the pre-step level): the
    throughput of a continuous-batching engine swings with the admission and completion of
    requests far more than a small step moves it, and the paired run removes the part of that
    swing the step does not change. The plant must be deterministic (noise off) for this.
    ``record_s`` defaults to 10 s (power) or 30 s (throughput loops, for the gain).
    """
    spec = _loop(loop)
    if paired is None:
        paired = spec.output == "throughput"
    if record_s is None:
        record_s = 30.0 if spec.output == "throughput" else 10.0
    probe = make_plant(power_cap_w=power_cap_w, max_batch=max_batch)
    dt = float(probe.dt_s)
    limits = probe.limits
    probe.close()
    total_s = warmup_s + pre_s + record_s
    # enough requests for the whole test at a generous bound on the token rate
    n_req = backlog_size(max_batch, total_s, output_tokens)
    requests = backlog(n_req, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                       seed=seed)
    n_warm = int(round(warmup_s / dt))
    n_pre = max(2, int(round(pre_s / dt)))
    n_rec = max(3, int(round(record_s / dt)))
    u0 = float(power_cap_w if spec.knob == "cap" else max_batch)
    u1 = u0 + step
    u1 = float(limits.clamp_batch(round(u1))) if spec.knob == "batch" else \
        float(limits.clamp_cap_w(u1))
    if u1 == u0:
        raise ConfigError("the step test's step is lost in the actuator's limits/rounding",
                          key="step", value=step)
    kw = dict(power_cap_w=power_cap_w, max_batch=max_batch, n_warm=n_warm, n_pre=n_pre,
              n_rec=n_rec, requests=requests)
    ts, us, ys, dt = _record(make_plant, spec, u1=u1, **kw)
    y = np.asarray(ys)
    if paired:
        _, _, ys_ref, _ = _record(make_plant, spec, u1=None, **kw)
        ref = np.asarray(ys_ref)
        y = y - ref + float(np.mean(ref[:n_pre]))
    return StepTest(loop=loop, t_s=np.asarray(ts), u=np.asarray(us), y=y, dt_s=dt,
                    window_s=dt, power_cap_w=float(power_cap_w), max_batch=int(max_batch))


def identify_from_step_test(test: StepTest) -> FOPDT:
    """`FOPDT` of the loop from a `StepTest` (gain, lag and dead time fitted; the averaging
    window is the plant's read window)."""
    spec = _loop(test.loop)
    return identify_fopdt(test.y, test.u, dt_s=test.dt_s, window_s=test.window_s,
                          input_name=spec.knob, output_name=spec.output)


def fopdt_from_gradients(gradients, *, loop: str, num_gpus: int, dt_s: float, window_s: float,
                         tau_s: float, delay_s: float) -> FOPDT:
    """`FOPDT` whose gain is the offline model's local sensitivity for the loop (the model is
    static: the lag and dead time come from a step test or the actuator's documentation)."""
    spec = _loop(loop)
    if loop == "budget":
        gain = float(gradients.dpower_dcap) / num_gpus
    elif loop == "margin":
        gain = float(gradients.dthroughput_dcap)
    else:
        gain = float(gradients.dthroughput_dbatch)
    if not math.isfinite(gain):
        raise ConfigError("the model's gradient is not finite at this operating point",
                          key=loop, value=gain)
    return FOPDT(gain=gain, tau_s=tau_s, delay_s=delay_s, dt_s=dt_s, window_s=window_s,
                 input_name=spec.knob, output_name=spec.output, source="model-gradients")
