"""Core data types that cross interfaces: frozen, keyword-only dataclasses, SI units, the unit
in every field name (``_w`` watts, ``_s`` seconds, ``_j`` joules, ``_tok_s`` tokens/second)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["SETPOINT_FIELDS", "Action", "Limits", "Measurement", "PlantInfo", "Request",
           "RequestResult", "Setpoint"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Measurement:
    """What a plant reports once per control period.

    Rates are means over the window; power and energy are summed over the plant's GPUs.

    Parameters
    ----------
    t_s : float
        Plant time at the end of the window, s.
    window_s : float
        Length of the window the rates are averaged over, s.
    power_w : float
        Mean power over the window, all GPUs, W (NVML-style averaged reading).
    energy_j : float
        Cumulative, monotonic energy counter summed over the GPUs, J (a decrease means the
        counter was reset).
    throughput_tok_s : float
        Generated tokens per second (tok/s).
    prompt_tok_s : float, default 0.0
        Prompt tokens processed per second (tok/s).
    demand_tok_s : float or None
        Offered load in generated tok/s when known (None: unknown).
    running, waiting : int, default 0
        Sequences running and waiting at the end of the window.
    kv_usage : float, default 0.0
        KV-cache usage, 0..1.
    ttft_p90_s, tpot_p90_s : float or None
        p90 time to first token and time per output token over the window, s (None: no sample).
    power_cap_w : float or None
        Cap in force per GPU, W (None: not known).
    max_batch : int or None
        Running-sequence limit in force (None: not known).
    sm_clock_mhz : float or None
        Mean SM clock, MHz (None: not measured).
    stale : bool, default False
        True when the sensor could not read: the other fields then repeat the last good values
        and the safety guard must react.
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
        """Tell whether every numeric field is finite and non-negative.

        Returns
        -------
        bool
            True when the measurement can be used.
        """
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
    """What the operator asks for at a time. Every field is optional (None: no constraint).

    Parameters
    ----------
    throughput_tok_s : float or None
        Generated-token throughput target for the plant, tok/s.
    tpot_slo_s, ttft_slo_s : float or None
        p90 time-per-output-token and time-to-first-token objectives, s.
    power_budget_w : float or None
        Ceiling on the plant's total power (all GPUs), W.
    power_target_w : float or None
        Total power to track (demand-response mode), W.
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
    """Knob settings; a knob left ``None`` is unchanged.

    Parameters
    ----------
    power_cap_w : float or None
        Power cap per GPU, W.
    max_batch : int or None
        Running-sequence limit (vLLM's ``max_num_seqs``).
    """

    power_cap_w: float | None = None
    max_batch: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """Hardware and engine bounds of a plant (caps per GPU, from NVML constraints).

    Parameters
    ----------
    power_cap_min_w, power_cap_max_w : float
        Smallest and largest power cap per GPU, W.
    power_cap_default_w : float
        The GPU's default cap, W.
    power_cap_step_w : float, default 1.0
        Granularity of the cap, W.
    max_batch_min, max_batch_max : int, default 1 and 256
        Bounds of the running-sequence limit (the largest: the engine's launch limit).
    num_gpus : int, default 1
        GPUs in the plant (every one takes the same cap).
    """

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
        """Clamp a per-GPU cap into [min, max] and round *down* to the cap step.

        Parameters
        ----------
        power_cap_w : float
            Cap per GPU asked for, W.

        Returns
        -------
        float
            The cap per GPU the plant can take, W.
        """
        c = min(max(power_cap_w, self.power_cap_min_w), self.power_cap_max_w)
        steps = math.floor((c - self.power_cap_min_w) / self.power_cap_step_w + 1e-9)
        return self.power_cap_min_w + steps * self.power_cap_step_w if c < self.power_cap_max_w \
            else self.power_cap_max_w

    def per_gpu_w(self, total_w: float) -> float:
        """Split a plant-wide power equally over the plant's GPUs.

        Parameters
        ----------
        total_w : float
            A power for all GPUs together (a budget, a target, a measured power), W.

        Returns
        -------
        float
            Watts per GPU, before clamping to the cap limits.

        Examples
        --------
        >>> Limits(power_cap_min_w=100, power_cap_max_w=400, power_cap_default_w=400,
        ...        num_gpus=4).per_gpu_w(900.0)
        225.0
        """
        return total_w / self.num_gpus

    def clamp_batch(self, max_batch: int) -> int:
        """Clamp a batch limit into [``max_batch_min``, ``max_batch_max``].

        Parameters
        ----------
        max_batch : int
            Batch limit asked for.

        Returns
        -------
        int
            The batch limit the plant can take.
        """
        return int(min(max(int(max_batch), self.max_batch_min), self.max_batch_max))


@dataclass(frozen=True, kw_only=True, slots=True)
class Request:
    """One inference request offered to the plant.

    Parameters
    ----------
    request_id : int
        Identifier, unique within a run.
    arrival_s : float
        Arrival time on the plant's clock, s.
    prompt_tokens, output_tokens : int
        Prompt length and number of tokens to generate.
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestResult:
    """A finished request with its timings (absolute plant times).

    Parameters
    ----------
    request_id : int
        The request's identifier.
    arrival_s, first_token_s, finish_s : float
        Arrival, first generated token and completion on the plant's clock, s.
    prompt_tokens, output_tokens : int
        Prompt length and tokens generated.
    preemptions : int, default 0
        Times the engine preempted the request (KV cache full).
    """

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float
    finish_s: float
    preemptions: int = 0

    @property
    def ttft_s(self) -> float:
        """Time to first token, s."""
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first, s (0 for one-token outputs)."""
        n = self.output_tokens - 1
        return (self.finish_s - self.first_token_s) / n if n > 0 else 0.0


@dataclass(frozen=True, kw_only=True, slots=True)
class PlantInfo:
    """Description of a plant handed to controllers at setup (no live handle to the plant).

    Parameters
    ----------
    model, gpu : str
        Preset names (or spec names) when known.
    num_gpus : int
        GPUs in the plant.
    simulated : bool
        Whether the plant is the simulator (``search-truth`` requires it).
    prompt_tokens_mean, output_tokens_mean : float or None
        Mean prompt and output lengths of the workload, tokens (None: unknown).
    extra : dict
        Free-form, JSON-serialisable details (e.g. ``parallelism``, ``dry_run``).
    """

    model: str
    gpu: str
    num_gpus: int
    simulated: bool
    prompt_tokens_mean: float | None = None
    output_tokens_mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
