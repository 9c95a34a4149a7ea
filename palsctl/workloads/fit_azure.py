"""Fit the synthetic default workload to an Azure LLM inference trace.

* Lengths: log-normal by moments of ``log(tokens)`` (maximum likelihood), clipped to the
  observed range.
* Arrivals: a 2-state Markov-modulated Poisson process, fitted as a Poisson hidden Markov model
  on per-``bin_s`` arrival counts by expectation-maximisation (Baum-Welch); the per-bin
  self-transition probability ``a_kk`` gives a mean dwell time ``bin_s / (1 - a_kk)``.

Limits of the fit (conversation trace): one log-normal smooths the two prompt-length modes
(~1,000 and ~4,100 tokens) — its mean is 1,226 tokens against 1,155 in the trace, output 213
against 211 —, prompt and output lengths are drawn independently (their log-correlation in the
trace is 0.09), and the trace's slow drift over the hour is folded into the two MMPP states.

Run ``python -m palsctl.workloads.fit_azure [PATH]`` to print the constants kept in
`palsctl.workloads.synthetic.AZURE_CONV_FIT` (PATH defaults to the shared data folder's
``azure-llm-2023/AzureLLMInferenceTrace_conv.csv``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from palsctl.workloads.synthetic import AzureFit, LogNormalLengths
from palsctl.workloads.traces import load_azure_csv

CONV_TRACE = "azure-llm-2023/AzureLLMInferenceTrace_conv.csv"


def fit_lognormal(tokens: np.ndarray) -> LogNormalLengths:
    """Fit a log-normal to token counts (their log mean and spread, min and max)."""
    logs = np.log(np.asarray(tokens, dtype=float))
    return LogNormalLengths(mu=round(float(logs.mean()), 6), sigma=round(float(logs.std()), 6),
                            min_tokens=int(np.min(tokens)), max_tokens=int(np.max(tokens)))


def fit_mmpp2(times_s: np.ndarray, *, bin_s: float = 1.0, iterations: int = 200,
              tol: float = 1e-9) -> tuple[tuple[float, float], tuple[float, float]]:
    """Fit a 2-state MMPP to arrival times: ``(rates_req_s, mean_dwell_s)``, low state first."""
    from scipy import stats

    counts = np.bincount((np.asarray(times_s) / bin_s).astype(np.int64)).astype(float)
    lam = np.array([np.percentile(counts, 25), np.percentile(counts, 90)]) + 0.1
    a = np.array([[0.9, 0.1], [0.1, 0.9]])
    pi = np.array([0.5, 0.5])
    n = len(counts)
    prev_ll = -np.inf
    for _ in range(iterations):
        b = stats.poisson.pmf(counts[:, None], lam[None, :]) + 1e-300  # (n, 2)
        alpha = np.empty((n, 2))
        scale = np.empty(n)
        alpha[0] = pi * b[0]
        scale[0] = alpha[0].sum()
        alpha[0] /= scale[0]
        for t in range(1, n):
            alpha[t] = (alpha[t - 1] @ a) * b[t]
            scale[t] = alpha[t].sum()
            alpha[t] /= scale[t]
        beta = np.empty((n, 2))
        beta[-1] = 1.0
        for t in range(n - 2, -1, -1):
            beta[t] = (a @ (b[t + 1] * beta[t + 1])) / scale[t + 1]
        gamma = alpha * beta
        gamma /= gamma.sum(axis=1, keepdims=True)
        xi = (alpha[:-1, :, None] * a[None] * (b[1:] * beta[1:])[:, None, :]) \
            / scale[1:, None, None]
        a = xi.sum(axis=0) / gamma[:-1].sum(axis=0)[:, None]
        a /= a.sum(axis=1, keepdims=True)
        lam = (gamma * counts[:, None]).sum(axis=0) / gamma.sum(axis=0)
        pi = gamma[0]
        ll = float(np.log(scale).sum())
        if ll - prev_ll < tol * abs(ll):
            break
        prev_ll = ll
    order = np.argsort(lam)
    rates = lam[order] / bin_s
    dwell = bin_s / (1.0 - np.diag(a)[order])
    return (round(float(rates[0]), 4), round(float(rates[1]), 4)), \
        (round(float(dwell[0]), 2), round(float(dwell[1]), 2))


def fit_azure(path: str | Path, *, bin_s: float = 1.0) -> AzureFit:
    """Fit the two-state MMPP and the length distributions to an Azure trace CSV."""
    trace = load_azure_csv(path)
    rates, dwell = fit_mmpp2(trace.times_s, bin_s=bin_s)
    return AzureFit(rates_req_s=rates, mean_dwell_s=dwell,
                    prompt=fit_lognormal(trace.prompt_tokens),
                    output=fit_lognormal(trace.output_tokens))


def main(argv: list[str] | None = None) -> int:
    """Print the fit of the Azure conversation trace as Python (refreshes AZURE_CONV_FIT)."""
    from palsctl.paths import data_file

    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else data_file(CONV_TRACE)
    fit = fit_azure(path)
    print(f"AZURE_CONV_FIT = AzureFit(\n    rates_req_s={fit.rates_req_s},\n"
          f"    mean_dwell_s={fit.mean_dwell_s},\n    prompt={fit.prompt},\n"
          f"    output={fit.output},\n)")
    print(f"# mean rate {fit.mean_rate_req_s:.3f} req/s, mean prompt {fit.prompt.mean():.1f}, "
          f"mean output {fit.output.mean():.1f} tokens")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
