"""Prometheus exporter of a closed loop's state, fed with its step records (``prometheus_client``).

Operators watch Prometheus and Grafana beside NVIDIA's DCGM exporter and vLLM's ``/metrics``;
`LoopExporter` puts the controller's side next to them. Feed it every `palsctl.loop.StepRecord`
(``exporter.observe(step)``, e.g. from the loop's per-step hook) and serve its registry
(``exporter.serve(port)``, loopback by default) or scrape ``exporter.registry`` in-process.

Series (SI units in the names, as Prometheus asks; ``*_total`` are counters):

=========================================  =========  =============================================
name                                       labels     value
=========================================  =========  =============================================
``palsctl_power_cap_watts``                gpu        the power cap applied to that GPU (W)
``palsctl_batch_limit``                               the running-sequence limit applied
``palsctl_power_budget_watts``                        the power budget in force for the group (W;
                                                      NaN when there is none)
``palsctl_power_watts``                               measured power of the group, window mean (W)
``palsctl_throughput_tokens_per_second``              generated tokens per second, window mean
``palsctl_tokens_per_joule``                          generated tokens per joule in the window
``palsctl_generated_tokens_total``                    generated tokens (so ``rate()`` works)
``palsctl_energy_joules_total``                       energy the group used (J)
``palsctl_control_steps_total``                       control steps taken
``palsctl_guard_interventions_total``                 steps in which the safety guard changed the
                                                      controller's action
``palsctl_stale_readings_total``                      steps whose measurement was stale
``palsctl_qos_violations_total``                      control windows with a QoS violation, as
                                                      `palsctl.metrics` scores them
``palsctl_sensor_faults_total``                       steps whose sensor read failed
``palsctl_actuator_faults_total``                     steps whose actuator write failed
``palsctl_actuator_failures_in_row``                  consecutive steps with a failed write (the
                                                      loop's alarm fires at 3: alert on ≥ 3)
``palsctl_controller_step_seconds``                   histogram of the guarded controller's step
                                                      time (wall clock, s)
=========================================  =========  =============================================

Every series carries ``model_name`` (the served model, as vLLM labels its ``vllm:*`` series);
per-GPU series carry ``gpu`` (the GPU's index, as the DCGM exporter labels
``DCGM_FI_DEV_POWER_USAGE``), so ``palsctl_power_cap_watts`` and ``DCGM_FI_DEV_POWER_USAGE`` join
on ``gpu``. Group series (power, throughput, batch) are the tensor-parallel group's totals.
``extra_labels`` adds constant labels (e.g. a replica name when several loops share a host).

QoS violations follow `palsctl.metrics.summarize` window by window (a test holds the two equal):
a window is scored against the setpoint in force during it (the previous step's); it violates
when its p90 TPOT or TTFT exceeds an SLO, or when a throughput target is set, requests waited in
every window of the trailing ``backlog_window_s`` and the mean throughput over those windows is
below ``(1 − throughput_tolerance)·target``.
"""
from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from palsctl.errors import ConfigError

__all__ = ["LoopExporter", "QosWindowCounter", "METRIC_NAMES", "STEP_SECONDS_BUCKETS"]

log = logging.getLogger(__name__)

#: Every series the exporter defines (histograms add ``_bucket``/``_sum``/``_count``).
METRIC_NAMES = (
    "palsctl_power_cap_watts", "palsctl_batch_limit", "palsctl_power_budget_watts",
    "palsctl_power_watts", "palsctl_throughput_tokens_per_second", "palsctl_tokens_per_joule",
    "palsctl_generated_tokens_total", "palsctl_energy_joules_total",
    "palsctl_control_steps_total", "palsctl_guard_interventions_total",
    "palsctl_stale_readings_total", "palsctl_qos_violations_total",
    "palsctl_sensor_faults_total", "palsctl_actuator_faults_total",
    "palsctl_actuator_failures_in_row", "palsctl_controller_step_seconds",
)

#: Buckets of the controller step-time histogram (s): 10 µs (a PI step) to 10 s (a slow solve).
STEP_SECONDS_BUCKETS = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


class QosWindowCounter:
    """Incremental form of `palsctl.metrics.summarize`'s per-window QoS verdict.

    ``update(step)`` takes the steps in order and returns ``(latency_violation, shortfall)`` for
    the step's window. Tolerances as `summarize`'s (``throughput_tolerance``, fraction;
    ``backlog_window_s``, seconds)."""

    def __init__(self, *, throughput_tolerance: float = 0.05,
                 backlog_window_s: float = 5.0) -> None:
        self.throughput_tolerance = float(throughput_tolerance)
        self.backlog_window_s = float(backlog_window_s)
        self._prev_setpoint: Any = None
        # trailing windows: (t_s, waiting > 0, throughput·window, window)
        self._trail: deque[tuple[float, bool, float, float]] = deque()

    def update(self, step: Any) -> tuple[bool, bool]:
        """Fold one step in; return (latency over an SLO, throughput shortfall) for its window."""
        m = step.measurement
        sp = self._prev_setpoint if self._prev_setpoint is not None else step.setpoint
        self._prev_setpoint = step.setpoint
        self._trail.append((step.t_s, m.waiting > 0, m.throughput_tok_s * m.window_s,
                            m.window_s))
        while len(self._trail) > 1 and self._trail[0][0] <= step.t_s - self.backlog_window_s:
            self._trail.popleft()
        latency = bool((sp.tpot_slo_s is not None and m.tpot_p90_s is not None
                        and m.tpot_p90_s > sp.tpot_slo_s)
                       or (sp.ttft_slo_s is not None and m.ttft_p90_s is not None
                           and m.ttft_p90_s > sp.ttft_slo_s))
        shortfall = False
        if sp.throughput_tok_s is not None and all(w for _, w, _, _ in self._trail):
            span = sum(x[3] for x in self._trail)
            mean = sum(x[2] for x in self._trail) / span if span > 1e-12 \
                else m.throughput_tok_s
            shortfall = mean < (1 - self.throughput_tolerance) * sp.throughput_tok_s
        return latency, shortfall


class LoopExporter:
    """The Prometheus series of one control loop (see the module doc), in its own registry.

    Parameters
    ----------
    model_name : str
        The served model's name (vLLM's ``model_name`` label); ``"unknown"`` if not known.
    gpus : sequence of int or str
        The group's GPU indices (the DCGM exporter's ``gpu`` label), one per GPU.
    extra_labels : mapping, optional
        Constant labels added to every series (names must not be ``gpu`` or ``model_name``).
    throughput_tolerance, backlog_window_s : float
        QoS violation rule, as in `palsctl.metrics.summarize`.
    """

    def __init__(self, *, model_name: str, gpus: Sequence[int | str],
                 extra_labels: Mapping[str, str] | None = None,
                 throughput_tolerance: float = 0.05, backlog_window_s: float = 5.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        gpus = [str(g) for g in gpus]
        if not gpus:
            raise ConfigError("the exporter needs at least one GPU index", key="gpus")
        extra = {str(k): str(v) for k, v in (extra_labels or {}).items()}
        for k in extra:
            if k in ("gpu", "model_name") or not k.isidentifier():
                raise ConfigError("invalid or reserved label name", key="extra_labels", value=k)
        self.model_name = str(model_name or "unknown")
        self.gpus = tuple(gpus)
        self.registry = CollectorRegistry(auto_describe=True)
        base = {"model_name": self.model_name, **extra}
        names = tuple(base)
        r = self.registry

        def gauge(name: str, doc: str, labels: tuple[str, ...] = names) -> Any:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str) -> Any:
            # prometheus_client appends _total to a counter's sample name
            return Counter(name.removesuffix("_total"), doc, names, registry=r)

        self._cap = gauge("palsctl_power_cap_watts", "Power cap applied to the GPU (W)",
                          ("gpu", *names))
        self._cap_children = [self._cap.labels(gpu=g, **base) for g in gpus]
        self._batch = gauge("palsctl_batch_limit", "Running-sequence limit applied").labels(**base)
        self._budget = gauge("palsctl_power_budget_watts",
                             "Power budget in force for the GPU group (W; NaN: none)"
                             ).labels(**base)
        self._power = gauge("palsctl_power_watts",
                            "Measured power of the GPU group, window mean (W)").labels(**base)
        self._thr = gauge("palsctl_throughput_tokens_per_second",
                          "Generated tokens per second, window mean").labels(**base)
        self._tpj = gauge("palsctl_tokens_per_joule",
                          "Generated tokens per joule in the last window").labels(**base)
        self._tokens = counter("palsctl_generated_tokens_total",
                               "Generated tokens").labels(**base)
        self._energy = counter("palsctl_energy_joules_total",
                               "Energy used by the GPU group (J)").labels(**base)
        self._steps = counter("palsctl_control_steps_total", "Control steps taken").labels(**base)
        self._guard = counter("palsctl_guard_interventions_total",
                              "Steps in which the safety guard changed the controller's action"
                              ).labels(**base)
        self._stale = counter("palsctl_stale_readings_total",
                              "Steps whose measurement was stale").labels(**base)
        self._qos = counter("palsctl_qos_violations_total",
                            "Control windows with a QoS violation (throughput shortfall or "
                            "p90 latency over the SLO)").labels(**base)
        self._sensor_faults = counter("palsctl_sensor_faults_total",
                                      "Steps whose sensor read failed").labels(**base)
        self._actuator_faults = counter("palsctl_actuator_faults_total",
                                        "Steps whose actuator write failed").labels(**base)
        self._actuator_in_row = gauge("palsctl_actuator_failures_in_row",
                                      "Consecutive steps with a failed actuator write"
                                      ).labels(**base)
        self._in_row = 0
        self._step_s = Histogram("palsctl_controller_step_seconds",
                                 "Wall time of the guarded controller's step (s)", names,
                                 buckets=STEP_SECONDS_BUCKETS, registry=r).labels(**base)
        self._budget.set(math.nan)
        self._qos_counter = QosWindowCounter(throughput_tolerance=throughput_tolerance,
                                             backlog_window_s=backlog_window_s)
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def observe(self, step: Any) -> None:
        """Update every series from one `palsctl.loop.StepRecord` (call once per step, in
        order). Never raises for odd values: a non-finite reading is skipped."""
        m, sp, applied = step.measurement, step.setpoint, step.applied
        with self._lock:
            cap = applied.power_cap_w if applied.power_cap_w is not None else m.power_cap_w
            if cap is not None:
                for child in self._cap_children:
                    child.set(cap)
            batch = applied.max_batch if applied.max_batch is not None else m.max_batch
            if batch is not None:
                self._batch.set(batch)
            self._budget.set(math.nan if sp.power_budget_w is None else sp.power_budget_w)
            finite = all(math.isfinite(v) and v >= 0
                         for v in (m.power_w, m.throughput_tok_s, m.window_s))
            if finite:
                self._power.set(m.power_w)
                self._thr.set(m.throughput_tok_s)
                self._tpj.set(m.throughput_tok_s / m.power_w if m.power_w > 0 else math.nan)
                self._tokens.inc(m.throughput_tok_s * m.window_s)
                self._energy.inc(m.power_w * m.window_s)
            self._steps.inc()
            if step.guard_note:
                self._guard.inc()
            if m.stale:
                self._stale.inc()
            # the loop's fault note: "sensor: ...; <guard's>; actuator: ..." (`ClosedLoop`)
            parts = [f.strip() for f in (getattr(step, "fault", "") or "").split(";")]
            if any(f.startswith("sensor:") for f in parts):
                self._sensor_faults.inc()
            if any(f.startswith("actuator:") for f in parts):
                self._actuator_faults.inc()
                self._in_row += 1
            else:
                self._in_row = 0
            self._actuator_in_row.set(self._in_row)
            latency, shortfall = self._qos_counter.update(step)
            if latency or shortfall:
                self._qos.inc()
            if math.isfinite(step.step_latency_s) and step.step_latency_s >= 0:
                self._step_s.observe(step.step_latency_s)

    __call__ = observe

    def text(self) -> str:
        """The exposition text a scrape would return."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    # ------------------------------------------------------------------ HTTP
    def serve(self, port: int, bind: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``bind:port`` from a daemon thread (``port`` 0 picks a free
        one) and return the port. Loopback by default: give ``bind="0.0.0.0"`` to expose it.
        Raises `ConfigError` when the address cannot be bound."""
        from prometheus_client import start_http_server

        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigError("must be a TCP port in [0, 65535]", key="metrics_port", value=port)
        if self._server is not None:
            raise RuntimeError("the exporter is already serving")
        try:
            self._server, self._thread = start_http_server(port, addr=bind,
                                                           registry=self.registry)
        except (OSError, ValueError) as exc:
            msg = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError(f"cannot listen on {bind}:{port}: {msg}", key="metrics_port",
                              value=port) from None
        bound = int(self._server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", bind, bound)
        return bound

    @property
    def port(self) -> int | None:
        """The port being served (None when not serving)."""
        return None if self._server is None else int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> LoopExporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
