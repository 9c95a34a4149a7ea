"""Synthetic load: Poisson arrivals and bursty arrivals from a Markov-modulated Poisson process
(MMPP), with prompt/output lengths drawn from clipped log-normal distributions.

Everything is generated lazily from one seeded `numpy.random.Generator`, in arrival order, so
``requests_between`` returns the same requests for a seed whatever the query windows.

``AZURE_CONV_FIT`` holds a 2-state MMPP and the length distributions fitted to the Azure LLM
inference trace 2023 (conversation) by `palsctl.workloads.fit_azure` (a test re-fits them from the
file and checks these constants); `azure_conv_workload` builds that workload at any mean rate,
so the default experiment runs with no data file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from palsctl.errors import ConfigError
from palsctl.types import Request
from palsctl.workloads.base import Workload, requests_from_arrays


@dataclass(frozen=True, kw_only=True)
class LogNormalLengths:
    """Token lengths ``round(exp(N(mu, sigma)))`` clipped to ``[min_tokens, max_tokens]``.

    Parameters
    ----------
    mu, sigma : float
        Mean and standard deviation of the log of the length (log tokens).
    min_tokens, max_tokens : int, default 1 and 1000000
        Bounds of a drawn length, tokens.
    """

    mu: float
    sigma: float
    min_tokens: int = 1
    max_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mu) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ConfigError(f"log-normal lengths need finite mu and sigma >= 0, got "
                              f"{self.mu}, {self.sigma}")
        if not (1 <= self.min_tokens <= self.max_tokens):
            raise ConfigError(f"need 1 <= min_tokens <= max_tokens, got {self.min_tokens}, "
                              f"{self.max_tokens}")

    @classmethod
    def from_mean(cls, mean_tokens: float, sigma: float = 0.0, **kw) -> "LogNormalLengths":
        """The log-normal with this (unclipped) mean: ``mu = ln(mean) - sigma²/2``."""
        if not (mean_tokens >= 1):
            raise ConfigError(f"mean length must be >= 1 token, got {mean_tokens}")
        return cls(mu=math.log(mean_tokens) - sigma * sigma / 2, sigma=sigma, **kw)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw n token counts (rounded, clipped to [min_tokens, max_tokens])."""
        x = np.rint(np.exp(rng.normal(self.mu, self.sigma, n)))
        return np.clip(x, self.min_tokens, self.max_tokens).astype(np.int64)

    def mean(self) -> float:
        """Mean of the clipped, rounded distribution (numerical, deterministic)."""
        if self.sigma == 0:
            return float(min(max(round(math.exp(self.mu)), self.min_tokens), self.max_tokens))
        # quadrature over the normal quantiles: accurate to well under a token
        inv = NormalDist().inv_cdf
        z = np.array([inv((i + 0.5) / 20000) for i in range(20000)])
        x = np.clip(np.rint(np.exp(self.mu + self.sigma * z)), self.min_tokens, self.max_tokens)
        return float(x.mean())


class _Lazy(Workload):
    """Arrival times generated lazily in chunks; lengths drawn with each arrival."""

    _CHUNK = 512

    def __init__(self, prompt: LogNormalLengths, output: LogNormalLengths, seed: int) -> None:
        self.prompt, self.output = prompt, output
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._times = np.zeros(0)
        self._prompt = np.zeros(0, dtype=np.int64)
        self._output = np.zeros(0, dtype=np.int64)
        self._t_gen = 0.0  # arrivals are complete up to this time
        self.mean_prompt_tokens = prompt.mean()
        self.mean_output_tokens = output.mean()

    def _more_times(self, n: int) -> tuple[np.ndarray, float]:
        """At least ``n`` (for Poisson exactly ``n``) next arrival times after ``_t_gen``, and the
        time up to which arrivals are now complete."""
        raise NotImplementedError

    def _extend(self, t_s: float) -> None:
        while self._t_gen <= t_s:
            new, self._t_gen = self._more_times(self._CHUNK)
            self._times = np.concatenate([self._times, new])
            self._prompt = np.concatenate([self._prompt, self.prompt.sample(self._rng, len(new))])
            self._output = np.concatenate([self._output, self.output.sample(self._rng, len(new))])

    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        if t1_s <= t0_s:
            return []
        self._extend(t1_s)
        i0 = int(np.searchsorted(self._times, t0_s, side="left"))
        i1 = int(np.searchsorted(self._times, t1_s, side="left"))
        return requests_from_arrays(self._times[i0:i1], self._prompt[i0:i1], self._output[i0:i1],
                                    first_id=i0)


class PoissonWorkload(_Lazy):
    """Poisson arrivals at a constant mean rate, log-normal lengths.

    Parameters
    ----------
    rate_req_s : float
        Mean arrival rate, req/s.
    prompt, output : LogNormalLengths
        Distributions of the prompt and output lengths.
    seed : int, default 0
        Seed of the arrival and length draws.
    """

    def __init__(self, rate_req_s: float, *, prompt: LogNormalLengths, output: LogNormalLengths,
                 seed: int = 0) -> None:
        if not (rate_req_s > 0 and math.isfinite(rate_req_s)):
            raise ConfigError(f"rate_req_s must be > 0, got {rate_req_s}")
        super().__init__(prompt, output, seed)
        self.rate_req_s = float(rate_req_s)

    def _more_times(self, n: int) -> tuple[np.ndarray, float]:
        times = self._t_gen + np.cumsum(self._rng.exponential(1.0 / self.rate_req_s, n))
        return times, float(times[-1])


class MMPPWorkload(_Lazy):
    """Markov-modulated Poisson arrivals (bursty), log-normal lengths.

    State ``k`` lasts an exponential time of mean ``mean_dwell_s[k]`` and emits Poisson arrivals
    at ``rates_req_s[k]``; it then jumps to another state uniformly (for two states: the other
    one). The stationary mean rate is ``Σ rate_k·dwell_k / Σ dwell_k``.

    Parameters
    ----------
    rates_req_s : tuple of float
        Arrival rate of each state, req/s.
    mean_dwell_s : tuple of float
        Mean time spent in each state, s.
    prompt, output : LogNormalLengths
        Distributions of the prompt and output lengths.
    seed : int, default 0
        Seed of the state, arrival and length draws.
    """

    def __init__(self, rates_req_s: tuple[float, ...], mean_dwell_s: tuple[float, ...], *,
                 prompt: LogNormalLengths, output: LogNormalLengths, seed: int = 0) -> None:
        rates = tuple(float(r) for r in rates_req_s)
        dwell = tuple(float(d) for d in mean_dwell_s)
        if len(rates) < 1 or len(rates) != len(dwell):
            raise ConfigError("MMPP needs as many rates as dwell times")
        if any(not (r >= 0 and math.isfinite(r)) for r in rates) or not any(r > 0 for r in rates):
            raise ConfigError(f"MMPP rates must be >= 0 and not all 0, got {rates}")
        if any(not (d > 0 and math.isfinite(d)) for d in dwell):
            raise ConfigError(f"MMPP dwell times must be > 0, got {dwell}")
        super().__init__(prompt, output, seed)
        self.rates_req_s, self.mean_dwell_s = rates, dwell
        self.rate_req_s = sum(r * d for r, d in zip(rates, dwell)) / sum(dwell)
        self._state = int(self._rng.choice(len(rates), p=np.array(dwell) / sum(dwell)))
        self._state_end = float(self._rng.exponential(dwell[self._state]))

    def _more_times(self, n: int) -> tuple[np.ndarray, float]:
        # one state sojourn at a time: given its length d, a Poisson process of rate r puts
        # Poisson(r·d) arrivals uniformly in it (vectorised per sojourn)
        rng, rates, dwell = self._rng, self.rates_req_s, self.mean_dwell_s
        parts: list[np.ndarray] = []
        count = 0
        t = self._t_gen
        while count < n:
            end = self._state_end
            if end > t:
                k = int(rng.poisson(rates[self._state] * (end - t)))
                if k:
                    parts.append(t + np.sort(rng.uniform(0.0, end - t, k)))
                    count += k
            t = end
            if len(rates) > 1:
                nxt = int(rng.integers(len(rates) - 1))
                self._state = nxt if nxt < self._state else nxt + 1
            self._state_end = t + float(rng.exponential(dwell[self._state]))
        return np.concatenate(parts), t


@dataclass(frozen=True, kw_only=True)
class AzureFit:
    """A 2-state MMPP and log-normal lengths fitted to a trace (see `fit_azure`)."""

    rates_req_s: tuple[float, float]
    mean_dwell_s: tuple[float, float]
    prompt: LogNormalLengths
    output: LogNormalLengths

    @property
    def mean_rate_req_s(self) -> float:
        """Long-run mean arrival rate, req/s (dwell-weighted mean of the states' rates)."""
        return sum(r * d for r, d in zip(self.rates_req_s, self.mean_dwell_s)) \
            / sum(self.mean_dwell_s)


# Fitted by ``python -m palsctl.workloads.fit_azure`` on AzureLLMInferenceTrace_conv.csv
# (19,366 requests over 58 min); checked against the file by tests/workloads/test_workloads.py.
AZURE_CONV_FIT = AzureFit(
    rates_req_s=(4.6164, 7.004),
    mean_dwell_s=(121.98, 75.64),
    prompt=LogNormalLengths(mu=6.633313, sigma=0.985154, min_tokens=2, max_tokens=14050),
    output=LogNormalLengths(mu=5.018997, sigma=0.859009, min_tokens=7, max_tokens=1000),
)


def azure_conv_workload(rate_req_s: float | None = None, *, seed: int = 0,
                        fit: AzureFit = AZURE_CONV_FIT) -> MMPPWorkload:
    """Build the MMPP fitted to the Azure conversation trace, rescaled to a mean rate.

    Both state rates are scaled by the same factor; burstiness (rate ratio, dwell times) and
    lengths are kept.

    Parameters
    ----------
    rate_req_s : float or None
        Mean arrival rate, req/s (None: the trace's own).
    seed : int, default 0
        Seed of the draws.
    fit : AzureFit, default AZURE_CONV_FIT
        The fitted rates, dwell times and length distributions.

    Returns
    -------
    MMPPWorkload
        The workload.
    """
    scale = 1.0 if rate_req_s is None else rate_req_s / fit.mean_rate_req_s
    return MMPPWorkload(tuple(r * scale for r in fit.rates_req_s), fit.mean_dwell_s,
                        prompt=fit.prompt, output=fit.output, seed=seed)
