"""Write the request trace of `moe_throughput_targets.toml` (deterministic; rerun to regenerate).

The offered load follows throughput targets shaped like PALS's 330 → 600 → 920 → 650 → 370 tok/s
steps, scaled so that the peak (920) is 75 % of the replica's full-power capacity (Mixtral-8x7B
on 4 × A100-SXM4-80GB, batch 256, at the trace's mean lengths, from the simulator's steady
state). Arrivals are Poisson within each segment; prompt/output lengths log-normal. The trace is
written in the Azure LLM trace format (TIMESTAMP, ContextTokens, GeneratedTokens) and the
matching ``[setpoint] throughput_tok_s`` steps are printed.

    python examples/make_step_trace.py
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np

SHAPE_TOK_S = (330.0, 600.0, 920.0, 650.0, 370.0)
SEGMENT_S = 180.0
PEAK_FRACTION = 0.75
PROMPT_MEAN, OUTPUT_MEAN, SIGMA, MAX_TOKENS = 512.0, 256.0, 0.5, 4096
OUT = Path(__file__).parent / "data" / "moe_throughput_targets.csv"


def main() -> None:
    from palsctl.plants.sim import steady_state

    rng = np.random.default_rng(20260521)
    cap = steady_state("mixtral-8x7b", "a100-sxm4-80gb", 4, 256, prompt_tokens=PROMPT_MEAN,
                       output_tokens=OUTPUT_MEAN).throughput_tok_s
    scale = PEAK_FRACTION * cap / max(SHAPE_TOK_S)
    targets = [round(s * scale) for s in SHAPE_TOK_S]
    mu = np.log(OUTPUT_MEAN) - SIGMA ** 2 / 2
    mu_p = np.log(PROMPT_MEAN) - SIGMA ** 2 / 2
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for k, target in enumerate(targets):
        rate = target / OUTPUT_MEAN
        t = k * SEGMENT_S + np.cumsum(rng.exponential(1.0 / rate, int(rate * SEGMENT_S * 1.5)))
        t = t[t < (k + 1) * SEGMENT_S]
        p = np.clip(rng.lognormal(mu_p, SIGMA, t.size).round(), 1, MAX_TOKENS).astype(int)
        o = np.clip(rng.lognormal(mu, SIGMA, t.size).round(), 1, MAX_TOKENS).astype(int)
        for ti, pi, oi in zip(t, p, o):
            stamp = (t0 + dt.timedelta(seconds=float(ti))).strftime("%Y-%m-%d %H:%M:%S.%f")
            rows.append(f"{stamp},{pi},{oi}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(rows) + "\n")
    steps = [[k * SEGMENT_S, float(x)] for k, x in enumerate(targets)]
    print(f"capacity {cap:.0f} tok/s; wrote {len(rows) - 1} requests to {OUT}")
    print(f"throughput_tok_s = {{ steps = {steps} }}")


if __name__ == "__main__":
    main()
