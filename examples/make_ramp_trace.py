"""Write the request trace of `stale_target_overload.toml` (deterministic; rerun to regenerate).

Qwen3-30B-A3B (MoE) on 2 × H100-SXM (tensor parallel 2). The offered load ramps from 35 % to
75 % of the replica's full-power capacity over 15 minutes, holds, then
falls back — while the operator's throughput target stays at the first minute's load: a stale
target that the load outgrows. Arrivals are bursty (Poisson with a rate modulated by an
on/off burst process every ~20 s: ±30 %); prompt lengths are heavy-tailed (log-normal, σ = 1.0) and
output lengths log-normal (σ = 0.6). The trace is written in the Azure LLM trace format
(TIMESTAMP, ContextTokens, GeneratedTokens); the stale target is printed.

    python examples/make_ramp_trace.py
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

MODEL, GPU, NUM_GPUS = "qwen3-30b-a3b", "h100-sxm", 2
DURATION_S = 1200.0
PROMPT_MEAN, OUTPUT_MEAN, SIGMA_P, SIGMA_O, MAX_TOKENS = 1500.0, 300.0, 1.0, 0.6, 32768
OUT = Path(__file__).parent / "data" / "stale_target_overload.csv"


def load_fraction(t_s: float) -> float:
    """35 % for the first minute, +2.7 points a minute up to 75 % at 16 min, then 50 %."""
    if t_s >= 1080.0:
        return 0.50
    return min(0.35 + 0.4 * max(0.0, t_s - 60.0) / 900.0, 0.75)


def main() -> None:
    from palsctl.plants.sim import steady_state

    rng = np.random.default_rng(20261207)
    cap = steady_state(MODEL, GPU, NUM_GPUS, 256, prompt_tokens=PROMPT_MEAN,
                       output_tokens=OUTPUT_MEAN).throughput_tok_s
    mu_p = np.log(PROMPT_MEAN) - SIGMA_P ** 2 / 2
    mu_o = np.log(OUTPUT_MEAN) - SIGMA_O ** 2 / 2
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    t, burst_until, burst = 0.0, 0.0, False
    while t < DURATION_S:
        if t >= burst_until:   # alternate calm and burst periods, ~20 s on average
            burst = not burst
            burst_until = t + rng.exponential(20.0)
        rate = load_fraction(t) * cap / OUTPUT_MEAN * (1.3 if burst else 0.7)
        t += rng.exponential(1.0 / rate)
        if t >= DURATION_S:
            break
        p = int(np.clip(round(rng.lognormal(mu_p, SIGMA_P)), 1, MAX_TOKENS))
        o = int(np.clip(round(rng.lognormal(mu_o, SIGMA_O)), 1, MAX_TOKENS))
        stamp = (t0 + dt.timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.%f")
        rows.append(f"{stamp},{p},{o}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(rows) + "\n")
    print(f"capacity {cap:.0f} tok/s; wrote {len(rows) - 1} requests to {OUT}")
    print(f"stale target: throughput_tok_s = {round(load_fraction(0.0) * cap)}")


if __name__ == "__main__":
    main()
