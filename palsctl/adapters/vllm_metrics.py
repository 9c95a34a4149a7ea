"""Read a vLLM server's Prometheus ``/metrics`` and turn counter/histogram deltas into rates and
quantiles over a window.

Metric names differ across vLLM releases; the parser accepts both spellings:

- inter-token latency: ``vllm:inter_token_latency_seconds`` (current), falling back to
  ``vllm:time_per_output_token_seconds`` (older releases);
- KV-cache usage (a 0..1 fraction despite the name): ``vllm:kv_cache_usage_perc`` (current) /
  ``vllm:gpu_cache_usage_perc`` (older).

Samples are summed over ``engine`` labels (data-parallel engines behind one API server) and
filtered by ``model_name`` when one is given. Counters that go down (the server restarted) are
treated as reset to zero. Quantiles follow Prometheus' ``histogram_quantile`` (linear
interpolation inside the bucket) applied to the bucket *deltas* of the window.

>>> snap = parse_metrics(text)                           # doctest: +SKIP
>>> w = window_stats(prev_snap, snap, window_s=1.0)      # doctest: +SKIP
>>> w.throughput_tok_s, w.tpot_p90_s                     # doctest: +SKIP
"""
from __future__ import annotations

import math
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from palsctl.errors import SensorError
from palsctl.types import Measurement

__all__ = ["Histogram", "MetricsError", "MetricsSnapshot", "MetricsWindow", "VllmMetricsSensor",
           "fetch_text", "histogram_quantile", "parse_metrics", "window_stats"]

GENERATION_TOKENS = "vllm:generation_tokens_total"
PROMPT_TOKENS = "vllm:prompt_tokens_total"
REQUEST_SUCCESS = "vllm:request_success_total"
PREEMPTIONS = "vllm:num_preemptions_total"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE_NAMES = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
TTFT_NAMES = ("vllm:time_to_first_token_seconds",)
ITL_NAMES = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
E2E_NAMES = ("vllm:e2e_request_latency_seconds",)
_USED = frozenset((GENERATION_TOKENS, PROMPT_TOKENS, REQUEST_SUCCESS, PREEMPTIONS, RUNNING, WAITING,
                   *KV_USAGE_NAMES))


class MetricsError(SensorError):
    """The metrics endpoint could not be read or does not look like a vLLM server's (a
    `SensorError`: the loop records a stale step and goes on)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Histogram:
    """A cumulative Prometheus histogram: ``buckets`` are (upper bound, cumulative count) sorted
    by bound, the last one ``+inf``; ``count`` observations summing to ``sum_s`` seconds."""

    buckets: tuple[tuple[float, float], ...]
    count: float
    sum_s: float

    def minus(self, older: "Histogram | None") -> "Histogram":
        """Observations made since ``older`` (``self`` whole when the counter was reset or the
        bucket layout changed)."""
        if older is None or older.count > self.count or \
                [b for b, _ in older.buckets] != [b for b, _ in self.buckets] or \
                any(o > n for (_, o), (_, n) in zip(older.buckets, self.buckets, strict=True)):
            return self
        return Histogram(buckets=tuple((b, n - o) for (b, n), (_, o) in
                                       zip(self.buckets, older.buckets, strict=True)),
                         count=self.count - older.count, sum_s=max(self.sum_s - older.sum_s, 0.0))

    def quantile(self, q: float) -> float | None:
        """Prometheus ``histogram_quantile``: None without observations; the largest finite
        bound when the quantile falls in the ``+inf`` bucket."""
        return histogram_quantile(q, self.buckets)


def histogram_quantile(q: float, buckets: tuple[tuple[float, float], ...]) -> float | None:
    """Quantile ``q`` (0..1) of a cumulative bucket list [(upper bound, cumulative count)]."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    if not buckets:
        return None
    total = buckets[-1][1]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > prev_count:
            if math.isinf(bound):
                return prev_bound
            if bound <= 0:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        if not math.isinf(bound):
            prev_bound = bound
        prev_count = count
    return prev_bound


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsSnapshot:
    """The vLLM metrics palsctl uses, at one scrape (counters cumulative; gauges instantaneous).

    ``kv_usage`` is the mean over engines (0..1), None when the server exports neither name.
    ``tpot`` is the inter-token latency histogram under whichever name the server uses."""

    generation_tokens: float
    prompt_tokens: float
    requests_finished: float
    preemptions: float
    running: float
    waiting: float
    kv_usage: float | None
    ttft: Histogram | None
    tpot: Histogram | None
    e2e: Histogram | None
    model_names: tuple[str, ...]
    engines: int


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsWindow:
    """Rates and quantiles over the window between two snapshots (per second, seconds)."""

    window_s: float
    throughput_tok_s: float
    prompt_tok_s: float
    finished_req_s: float
    generation_tokens: float
    ttft_p90_s: float | None
    tpot_p90_s: float | None
    running: int
    waiting: int
    kv_usage: float
    counter_reset: bool


def parse_metrics(text: str, *, model_name: str | None = None) -> MetricsSnapshot:
    """Parse Prometheus exposition text from a vLLM server into a `MetricsSnapshot`.

    Raises `MetricsError` when the text is not valid exposition format, holds no vLLM request
    metrics (for ``model_name``, when given), a sample palsctl uses is not a finite number (NaN,
    ±Inf) or a histogram bucket has no numeric ``le`` bound."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    # histogram name -> {"bucket": {le: v}, "count": v, "sum": v}
    hists: dict[str, dict] = {}
    models: set[str] = set()
    engines: set[str] = set()
    hist_names = set(TTFT_NAMES + ITL_NAMES + E2E_NAMES)
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:  # noqa: BLE001 - the parser raises ValueError/IndexError/...
        raise MetricsError(f"not Prometheus exposition text: {exc}") from None
    for family in families:
        if not family.name.startswith("vllm:"):
            continue
        for s in family.samples:
            labels = s.labels
            if model_name is not None and labels.get("model_name", model_name) != model_name:
                continue
            if "model_name" in labels:
                models.add(labels["model_name"])
            if "engine" in labels:
                engines.add(labels["engine"])
            name = s.name
            is_hist = family.type == "histogram" and family.name in hist_names
            if not is_hist and name not in _USED:
                continue            # not read by palsctl (nor checked)
            if not math.isfinite(s.value) and not name.endswith("_created"):
                raise MetricsError(f"{name}{_labels(labels)} is {s.value}, not a finite number")
            if is_hist:
                h = hists.setdefault(family.name, {"bucket": defaultdict(float), "count": 0.0,
                                                   "sum": 0.0})
                if name.endswith("_bucket"):
                    try:
                        le = float(labels["le"])
                    except (KeyError, ValueError):
                        raise MetricsError(f"{name}{_labels(labels)}: a bucket without a numeric "
                                           f"'le' bound") from None
                    if math.isnan(le):
                        raise MetricsError(f"{name}{_labels(labels)}: bucket bound 'le' is NaN")
                    h["bucket"][le] += s.value
                elif name.endswith("_count"):
                    h["count"] += s.value
                elif name.endswith("_sum"):
                    h["sum"] += s.value
                continue
            sums[name] += s.value
            counts[name] += 1

    def hist(names: tuple[str, ...]) -> Histogram | None:
        for n in names:
            h = hists.get(n)
            if h and h["bucket"]:
                bounds = sorted(h["bucket"])
                return Histogram(buckets=tuple((b, h["bucket"][b]) for b in bounds),
                                 count=h["count"], sum_s=h["sum"])
        return None

    if RUNNING not in counts and GENERATION_TOKENS not in counts:
        who = f" for model_name={model_name!r}" if model_name else ""
        raise MetricsError(f"no vLLM request metrics{who} (expected {RUNNING} and "
                           f"{GENERATION_TOKENS})")
    kv = None
    for n in KV_USAGE_NAMES:
        if counts.get(n):
            kv = sums[n] / counts[n]
            break
    return MetricsSnapshot(
        generation_tokens=sums.get(GENERATION_TOKENS, 0.0),
        prompt_tokens=sums.get(PROMPT_TOKENS, 0.0),
        requests_finished=sums.get(REQUEST_SUCCESS, 0.0),
        preemptions=sums.get(PREEMPTIONS, 0.0),
        running=sums.get(RUNNING, 0.0), waiting=sums.get(WAITING, 0.0), kv_usage=kv,
        ttft=hist(TTFT_NAMES), tpot=hist(ITL_NAMES), e2e=hist(E2E_NAMES),
        model_names=tuple(sorted(models)), engines=max(len(engines), 1))


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())[:4]) + "}" \
        if labels else ""


def _delta(new: float, old: float) -> tuple[float, bool]:
    """Counter increase; a decrease means the counter restarted from zero."""
    return (new, True) if new < old else (new - old, False)


def window_stats(prev: MetricsSnapshot | None, cur: MetricsSnapshot, *, window_s: float,
                 quantile: float = 0.9) -> MetricsWindow:
    """Rates over ``window_s`` seconds between two snapshots and latency quantiles from the
    histogram bucket deltas. With ``prev`` None, counters count from zero (the server's start)."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    zero = 0.0
    gen, r1 = _delta(cur.generation_tokens, prev.generation_tokens if prev else zero)
    prompt, r2 = _delta(cur.prompt_tokens, prev.prompt_tokens if prev else zero)
    fin, r3 = _delta(cur.requests_finished, prev.requests_finished if prev else zero)
    ttft = cur.ttft.minus(prev.ttft if prev else None) if cur.ttft else None
    tpot = cur.tpot.minus(prev.tpot if prev else None) if cur.tpot else None
    return MetricsWindow(
        window_s=window_s, throughput_tok_s=gen / window_s, prompt_tok_s=prompt / window_s,
        finished_req_s=fin / window_s, generation_tokens=gen,
        ttft_p90_s=ttft.quantile(quantile) if ttft else None,
        tpot_p90_s=tpot.quantile(quantile) if tpot else None,
        running=int(round(cur.running)), waiting=int(round(cur.waiting)),
        kv_usage=min(max(cur.kv_usage or 0.0, 0.0), 1.0), counter_reset=r1 or r2 or r3)


def fetch_text(url: str, *, timeout_s: float = 2.0) -> str:
    """GET ``url`` and return its body; `MetricsError` on any network/HTTP failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - user's URL
            return resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetricsError(f"cannot read {url}: {exc}") from None


class VllmMetricsSensor:
    """Scrapes ``url`` (a vLLM ``/metrics`` endpoint) and reports windows between scrapes.

    A `palsctl.interfaces.Sensor`: ``read()`` returns the window as a `Measurement` with the
    engine fields (throughput, prompt tokens/s, running, waiting, KV usage, p90 TTFT and
    inter-token latency; the power fields are zero: another sensor measures power) and raises
    `MetricsError` (a `SensorError`) when the endpoint cannot be read.
    ``fetch``: a callable ``url -> text`` (tests inject one); ``clock``: monotonic seconds.
    The first `read_window` primes the sensor and reports the window since the previous call of
    `prime` (or rates of zero over a tiny window when never primed)."""

    def __init__(self, url: str, *, model_name: str | None = None, timeout_s: float = 2.0,
                 quantile: float = 0.9, fetch: Callable[[str], str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.model_name = model_name
        self.quantile = quantile
        self._fetch = fetch or (lambda u: fetch_text(u, timeout_s=timeout_s))
        self._clock = clock
        self._prev: MetricsSnapshot | None = None
        self._prev_t = 0.0                   # when _prev was scraped (read once _prev is set)
        self._t0: float | None = None

    def scrape(self) -> MetricsSnapshot:
        """Fetch ``url`` once and parse it (`parse_metrics`); `MetricsError` when unreadable."""
        return parse_metrics(self._fetch(self.url), model_name=self.model_name)

    def prime(self) -> MetricsSnapshot:
        """Take the reference snapshot that the next window starts from."""
        self._prev, self._prev_t = self.scrape(), self._clock()
        return self._prev

    def read_window(self) -> MetricsWindow:
        """The window since the previous scrape; raises `MetricsError` when unreadable (the
        reference snapshot is kept, so the next good read covers the whole gap)."""
        snap = self.scrape()
        now = self._clock()
        if self._prev is None:
            self._prev, self._prev_t = snap, now
            return window_stats(snap, snap, window_s=1e-9, quantile=self.quantile)
        w = window_stats(self._prev, snap, window_s=max(now - self._prev_t, 1e-9),
                         quantile=self.quantile)
        self._prev, self._prev_t = snap, now
        return w

    def read(self) -> Measurement:
        """The window since the previous scrape as a `Measurement` (engine fields only)."""
        w = self.read_window()
        if self._t0 is None:                 # times count from the start of the first window
            self._t0 = self._prev_t - w.window_s
        return Measurement(t_s=self._prev_t - self._t0, window_s=w.window_s, power_w=0.0,
                           energy_j=0.0, throughput_tok_s=w.throughput_tok_s,
                           prompt_tok_s=w.prompt_tok_s, running=w.running, waiting=w.waiting,
                           kv_usage=w.kv_usage, ttft_p90_s=w.ttft_p90_s,
                           tpot_p90_s=w.tpot_p90_s)
