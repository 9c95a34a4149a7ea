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

The throughput of a continuous-batching engine is noisy at the control period (tokens arrive in
whole engine steps; requests finish and are admitted at their own times), so the throughput
loops' tests are repeated with different request lengths (seeds) and the mean response is
fitted; the spread between the repeats measures the noise left in that mean. `assess_fit` says
whether a model explains the recorded response: its normalised fit, or, for a noisy output, a
residual no larger than that noise with a step well above it. A loop whose model does not fit
cannot be verified by the analysis.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from palsctl.analysis.plant_model import fit_percent
from palsctl.analysis.stability import FOPDT, identify_fopdt, simulate_fopdt_response
from palsctl.errors import ConfigError, PalsctlError
from palsctl.interfaces import SimulatedPlant
from palsctl.types import Action, Request

__all__ = ["LOOPS", "LoopSpec", "StepTest", "FitQuality", "backlog", "backlog_size",
           "step_test", "identify_from_step_test", "fopdt_from_gradients", "assess_fit",
           "FIT_OK_PCT", "NOISE_RATIO_OK", "MIN_SNR"]

#: A model fits when it explains this share of the response (normalised fit, per cent) ...
FIT_OK_PCT = 80.0
#: ... or, for a noisy output, when its residual is at most this multiple of the noise left in
#: the (averaged) response, and the step's amplitude is at least `MIN_SNR` times that noise.
NOISE_RATIO_OK = 1.5
MIN_SNR = 5.0


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
    """A recorded step test: ``y[k]`` read at ``t_s[k]``, ``u[k]`` applied right after.

    ``y`` is the mean over ``repeats`` runs with different request lengths; ``noise_rms`` the
    standard error of that mean (RMS over the samples from the step on, output units), None
    for a single run."""

    loop: str
    t_s: np.ndarray
    u: np.ndarray
    y: np.ndarray
    dt_s: float
    window_s: float
    power_cap_w: float
    max_batch: int
    repeats: int = 1
    noise_rms: float | None = None

    @property
    def step_index(self) -> int:
        """Index of the first sample under the new input."""
        return int(np.flatnonzero(np.abs(np.diff(self.u)) > 0)[0]) + 1


@dataclass(frozen=True, kw_only=True)
class FitQuality:
    """How well a plant model explains a step test (see `assess_fit`).

    ``fit_pct``: normalised fit of the response from the step on (100 = exact);
    ``residual_rms``: RMS of model − data there (output units); ``noise_rms``: the noise left in
    the recorded response (None: unknown, a single run); ``step_amplitude``: ``|K·Δu|`` of the
    model; ``verdict``: ``"fits"``, ``"fits within the noise"``, ``"does not fit"`` or
    ``"step lost in noise"``."""

    fit_pct: float
    residual_rms: float
    noise_rms: float | None
    step_amplitude: float
    verdict: str

    @property
    def ok(self) -> bool:
        """Whether the model fits the step test (within the measured noise)."""
        return self.verdict in ("fits", "fits within the noise")

    @property
    def snr(self) -> float:
        """Step amplitude over the noise (inf when the noise is 0 or unknown)."""
        if not self.noise_rms:
            return math.inf
        return self.step_amplitude / self.noise_rms

    def text(self) -> str:
        """E.g. ``fit 99.8 %`` or ``fit 22 %, residual 2.8x the noise: does not fit``."""
        head = f"fit {self.fit_pct:.0f} %" if math.isfinite(self.fit_pct) else "fit -"
        if self.verdict == "fits":
            return head
        if self.noise_rms:
            head += f", residual {self.residual_rms / self.noise_rms:.1f}x the noise"
            if self.snr < MIN_SNR:
                head += f", step {self.snr:.1f}x the noise"
        return f"{head}: {self.verdict}"

    def to_dict(self) -> dict[str, Any]:
        """The fit as a JSON-serialisable dict."""
        return {"fit_pct": self.fit_pct, "residual_rms": self.residual_rms,
                "noise_rms": self.noise_rms, "step_amplitude": self.step_amplitude,
                "verdict": self.verdict, "ok": self.ok}


def assess_fit(test: StepTest, plant: FOPDT) -> FitQuality:
    """Does ``plant`` explain ``test``? Its response to the recorded input is compared with the
    recorded output from the step on: it **fits** when the normalised fit reaches `FIT_OK_PCT`;
    it **fits within the noise** when the residual is at most `NOISE_RATIO_OK` times the noise
    of the recorded (averaged) response and the step stands `MIN_SNR` times above that noise;
    otherwise the step is **lost in noise** (too small against the noise to tell) or the model
    **does not fit** (first order plus dead time does not describe this loop here)."""
    k0 = test.step_index
    y0 = float(np.mean(test.y[max(0, k0 - 3):k0]))
    model = simulate_fopdt_response(plant, test.u - test.u[0], method="closed-form") + y0
    resid = model[k0:] - test.y[k0:]
    rms = float(np.sqrt(np.mean(resid ** 2)))
    fit = fit_percent(test.y[k0:], model[k0:])
    amp = abs(plant.gain * float(test.u[-1] - test.u[0]))
    noise = test.noise_rms
    if math.isfinite(fit) and fit >= FIT_OK_PCT:
        verdict = "fits"
    elif noise and amp < MIN_SNR * noise:
        verdict = "step lost in noise"
    elif noise and rms <= NOISE_RATIO_OK * noise:
        verdict = "fits within the noise"
    else:
        verdict = "does not fit"
    return FitQuality(fit_pct=fit, residual_rms=rms, noise_rms=noise, step_amplitude=amp,
                      verdict=verdict)


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
                    output_tokens=int(o)) for i, (p, o) in enumerate(zip(ps, os_, strict=True))]


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
              seed: int = 0, paired: bool | None = None, repeats: int | None = None) -> StepTest:
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
    ``repeats`` (default: 4 for the throughput loops, 1 for power) runs the test with seeds
    ``seed, seed + 1, ...`` (other request lengths) and records the mean response and its
    standard error (`StepTest.noise_rms`).
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
    if repeats is None:
        repeats = 4 if spec.output == "throughput" else 1
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError("must be a whole number >= 1", key="repeats", value=repeats)
    total_s = warmup_s + pre_s + record_s
    # enough requests for the whole test at a generous bound on the token rate
    n_req = backlog_size(max_batch, total_s, output_tokens)
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
    runs = []
    for r in range(repeats):
        requests = backlog(n_req, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
                           seed=seed + r)
        kw: dict[str, Any] = dict(power_cap_w=power_cap_w, max_batch=max_batch, n_warm=n_warm,
                                  n_pre=n_pre, n_rec=n_rec, requests=requests)
        ts, us, ys, dt = _record(make_plant, spec, u1=u1, **kw)
        y = np.asarray(ys)
        if paired:
            _, _, ys_ref, _ = _record(make_plant, spec, u1=None, **kw)
            ref = np.asarray(ys_ref)
            y = y - ref + float(np.mean(ref[:n_pre]))
        runs.append(y)
    ys_all = np.asarray(runs)
    noise = None
    if repeats > 1:
        k0 = n_pre      # first sample under the new input
        noise = float(np.sqrt(np.mean(ys_all[:, k0:].var(axis=0, ddof=1)) / repeats))
    return StepTest(loop=loop, t_s=np.asarray(ts), u=np.asarray(us), y=ys_all.mean(axis=0),
                    dt_s=dt, window_s=dt, power_cap_w=float(power_cap_w),
                    max_batch=int(max_batch), repeats=repeats, noise_rms=noise)


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
