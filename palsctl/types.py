"""Core data types that cross interfaces: frozen, keyword-only dataclasses, SI units, the unit
in every field name (``_w`` watts, ``_s`` seconds, ``_j`` joules, ``_tok_s`` tokens/second)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class Measurement:
    """What a plant reports once per control period.

    ``power_w`` is the mean power over the window summed over the plant's GPUs (NVML-style
    averaged reading); ``energy_j`` is the plant's *cumulative*, monotonic energy counter summed
    over GPUs (a decrease means the counter was reset). Rates are means over ``window_s``.
    ``power_cap_w`` is the cap in force *per GPU*; ``max_batch`` the running-sequence limit in
    force. ``stale`` is True when the sensor could not read: the other fields then repeat the last
    good values and the safety guard must react.
    """

    t_s: float
    window_s: float
    power_w: float
    energy_j: float
    throughput_tok_s: float
    prompt_tok_s: float = 0.0
    demand_tok_s: float | None = None
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    ttft_p90_s: float | None = None
    tpot_p90_s: float | None = None
    power_cap_w: float | None = None
    max_batch: int | None = None
    sm_clock_mhz: float | None = None
    stale: bool = False

    def is_valid(self) -> bool:
        """True when every numeric field is finite and non-negative."""
        for name in ("t_s", "window_s", "power_w", "energy_j", "throughput_tok_s", "prompt_tok_s",
                     "kv_usage"):
            v = getattr(self, name)
            if v is None or not math.isfinite(v) or v < 0:
                return False
        for name in ("demand_tok_s", "ttft_p90_s", "tpot_p90_s", "power_cap_w", "sm_clock_mhz"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                return False
        return self.running >= 0 and self.waiting >= 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Setpoint:
    """What the operator asks for at a time. Every field is optional (None = no constraint).

    ``throughput_tok_s``: generated-token throughput target for the plant.
    ``tpot_slo_s`` / ``ttft_slo_s``: p90 latency objectives.
    ``power_budget_w``: ceiling on the plant's total power (all GPUs).
    ``power_target_w``: power to track (demand-response mode).
    """

    throughput_tok_s: float | None = None
    tpot_slo_s: float | None = None
    ttft_slo_s: float | None = None
    power_budget_w: float | None = None
    power_target_w: float | None = None


#: The names of the `Setpoint` fields, in declaration order: the one list of them (the
#: ``[setpoint]`` keys of an experiment, the schedule's fields, the setpoint columns of a run).
SETPOINT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Setpoint))


@dataclass(frozen=True, kw_only=True, slots=True)
class Action:
    """Knob settings. ``power_cap_w`` is per GPU; ``max_batch`` the running-sequence limit.
    ``None`` leaves a knob unchanged."""

    power_cap_w: float | None = None
    max_batch: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Hardware and engine bounds of a plant (caps per GPU, from NVML constraints)."""

    power_cap_min_w: float
    power_cap_max_w: float
    power_cap_default_w: float
    power_cap_step_w: float = 1.0
    max_batch_min: int = 1
    max_batch_max: int = 256
    num_gpus: int = 1

    def __post_init__(self) -> None:
        if not (0 < self.power_cap_min_w <= self.power_cap_default_w <= self.power_cap_max_w):
            raise ValueError(
                "Limits need 0 < power_cap_min_w <= power_cap_default_w <= power_cap_max_w, got "
                f"{self.power_cap_min_w}, {self.power_cap_default_w}, {self.power_cap_max_w}")
        if self.power_cap_step_w <= 0:
            raise ValueError(f"power_cap_step_w must be > 0, got {self.power_cap_step_w}")
        if not (1 <= self.max_batch_min <= self.max_batch_max):
            raise ValueError(f"need 1 <= max_batch_min <= max_batch_max, got "
                             f"{self.max_batch_min}, {self.max_batch_max}")
        if self.num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {self.num_gpus}")

    def clamp_cap_w(self, power_cap_w: float) -> float:
        """Clamp a per-GPU cap into [min, max] and round *down* to the cap step."""
        c = min(max(power_cap_w, self.power_cap_min_w), self.power_cap_max_w)
        steps = math.floor((c - self.power_cap_min_w) / self.power_cap_step_w + 1e-9)
        return self.power_cap_min_w + steps * self.power_cap_step_w if c < self.power_cap_max_w \
            else self.power_cap_max_w

    def per_gpu_w(self, total_w: float) -> float:
        """A plant-wide power (a budget, a target, a measured power; watts, all GPUs) split
        equally over the plant's GPUs: watts per GPU, before clamping to the cap limits.

        >>> Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
        ...        num_gpus=4).per_gpu_w(900.0)
        225.0
        """
        return total_w / self.num_gpus

    def clamp_batch(self, max_batch: int) -> int:
        return int(min(max(int(max_batch), self.max_batch_min), self.max_batch_max))


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """One inference request offered to the plant."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestResult:
    """A finished request with its timings (absolute plant times, seconds)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float
    finish_s: float
    preemptions: int = 0

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for one-token outputs)."""
        n = self.output_tokens - 1
        return (self.finish_s - self.first_token_s) / n if n > 0 else 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class PlantInfo:
    """Description of a plant handed to controllers at setup (no live handle to the plant).

    ``model``/``gpu`` are preset names (or spec names) when known; ``simulated`` tells whether the
    plant is the simulator (only the `oracle` controller requires it). ``extra`` carries
    free-form, JSON-serialisable details (e.g. workload mean prompt/output lengths).
    """

    model: str
    gpu: str
    num_gpus: int
    simulated: bool
    prompt_tokens_mean: float | None = None
    output_tokens_mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
