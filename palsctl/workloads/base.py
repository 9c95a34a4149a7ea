"""What every workload offers the loop."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from palsctl.types import Request


class Workload(ABC):
    """A source of `Request`s on a time axis starting at 0 s (the start of the run).

    ``requests_between(t0_s, t1_s)`` returns the arrivals in ``[t0_s, t1_s)`` — deterministic for
    a seed, whatever the sequence of queries. ``rate_req_s``, ``mean_prompt_tokens`` and
    ``mean_output_tokens`` describe the offered load; ``demand_tok_s`` is the mean offered
    generated-token rate (rate × mean output length).
    """

    rate_req_s: float
    mean_prompt_tokens: float
    mean_output_tokens: float

    @property
    def demand_tok_s(self) -> float:
        """Mean offered load in generated tokens per second (tok/s)."""
        return self.rate_req_s * self.mean_output_tokens

    @abstractmethod
    def requests_between(self, t0_s: float, t1_s: float) -> list[Request]:
        """List the requests arriving in [t0_s, t1_s) (seconds since the start)."""


def requests_from_arrays(times_s: np.ndarray, prompt: np.ndarray, output: np.ndarray,
                         first_id: int) -> list[Request]:
    """Build `Request`s from parallel arrays (ids consecutive from ``first_id``)."""
    return [Request(request_id=first_id + i, arrival_s=float(t), prompt_tokens=int(p),
                    output_tokens=int(o))
            for i, (t, p, o) in enumerate(zip(times_s.tolist(), prompt.tolist(), output.tolist()))]
