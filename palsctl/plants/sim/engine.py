"""A vLLM-like continuous-batching engine on a simulated GPU group, with firmware power capping.

Scheduling follows vLLM V1: every step first serves the running sequences (one decode token
each, then the prefill chunks of partly prefilled ones, in admission order) and then admits
waiting requests in FIFO order while fewer than ``max_batch`` run, the chunked-prefill token
budget lasts and the KV cache has room. When the KV cache cannot hold the next decode tokens
the most recently admitted sequence is preempted (recompute: it goes back to the front of the
waiting queue and re-prefills its prompt plus the tokens it had generated).

Speed: between events (an arrival that could be admitted, a sequence finishing, the KV cache
filling up, the end of the simulated interval, a power-cap change settling) all engine steps
are identical pure-decode steps whose context grows by one token per sequence per step, so
their times form an arithmetic sequence. The engine leaps over such runs in closed form
instead of stepping one iteration at a time. A saturated replica finishes and admits about one
request per step, so there every step is a mixed one and the cost is Python work per step and
per request; that path is kept lean: the step runs inline in `Engine.run_until`, its time and
power at the max clock come from cached attention-free partial sums
(`GroupModel.time_power_max_clock`), finishing sequences wait in per-step lists behind a heap of
step numbers, and the latency histograms are binned in bulk when read (TTFT, TPOT and
end-to-end from the records the engine keeps anyway). Under a power cap the firmware's clock
is the highest point of the 16-halving bisection's grid that fits; it is found by Newton steps on
that grid from the last answer (`_grid_search`), 2-4 power evaluations instead of 18, with the
bisection's answer. Every floating-point operation is done
in the same order as in the plain formulation (`GroupModel.step_cost`, `GroupModel.step_time`,
`GroupModel.power_per_gpu`), so results do not depend on which path computed them.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections import deque
from collections.abc import Callable
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np

from palsctl.plants.sim.gpu import GroupModel, StepCost
from palsctl.types import Request, RequestResult

__all__ = ["Engine", "Histogram", "TTFT_BUCKETS_S", "ITL_BUCKETS_S", "E2E_BUCKETS_S"]

# vLLM's Prometheus histogram boundaries (seconds)
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                  5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

CAP_SETTLE_TAU_S = 0.1     # time constant of the firmware's response to a new power limit
FW_WINDOW_S = 0.1          # the firmware keeps power averaged over this trailing window ≤ cap
BIN_EVERY = 4096           # a histogram bins its pending observations at least this often
HISTORY_S = 2.5            # energy history kept for windowed averages (s)
HISTORY_TRIM = 16384       # segments held before the history is trimmed to HISTORY_S
_DEC, _PREF, _WAIT, _PENDING, _DONE = 0, 1, 2, 3, 4
_GRID_HALVINGS = 16        # the firmware resolves its clock to (1 - r_min) / 2**16
_GRID_N = 1 << _GRID_HALVINGS
_CLOCK_GRIDS: dict[float, list[float]] = {}


def _clock_grid(r_min: float) -> list[float]:
    """Every point 16 halvings of [r_min, 1] can end on, ascending, with 1.0 appended: entry k
    is the ``lo`` a bisection ends with after taking the upper half where k's bits are 1 (most
    significant first). Built with the bisection's own arithmetic, so the points are equal."""
    grid = _CLOCK_GRIDS.get(r_min)
    if grid is None:
        lo = np.array([r_min])
        hi = np.array([1.0])
        for _ in range(_GRID_HALVINGS):
            mid = 0.5 * (lo + hi)
            lo = np.stack([lo, mid], axis=1).ravel()     # lower half keeps lo, upper takes mid
            hi = np.stack([mid, hi], axis=1).ravel()
        grid = _CLOCK_GRIDS[r_min] = [*lo.tolist(), 1.0]
    return grid


def _grid_search(grid: list[float], value: Callable[[float], float], guess: int) -> int:
    """The highest index a of ``grid`` where ``value(grid[a]) <= 0``, -1 if there is none.
    ``value`` must be increasing along the grid, so that the test holds up to a point and fails
    beyond, and the answer is the one a bisection over the grid gives. Newton steps on the grid
    from ``guess``: evaluate a point and its neighbour towards the answer, step to where their
    line crosses zero; a few such steps, then bisection. Two to four evaluations when ``value``
    is smooth and the guess near, at most about 24."""
    top = len(grid) - 1
    a, b = -1, top + 1               # the test holds at a and fails at b (-1, top + 1: virtual)
    k = guess if 0 <= guess <= top else top // 2
    steps = 0
    while True:
        m = value(grid[k])
        if m <= 0.0:
            a, j = k, k + 1
        else:
            b, j = k, k - 1
        if b - a <= 1:
            return a
        if steps < 8 and 0 <= j <= top:
            mj = value(grid[j])
            if mj <= 0.0:
                if j > a:
                    a = j
            elif j < b:
                b = j
            if b - a <= 1:
                return a
            steps += 1
            if mj != m:
                x = k - m * (j - k) / (mj - m)
                if a < x < b:
                    k = int(x)
                    if k <= a:
                        k = a + 1
                    continue
        k = (a + b) // 2


class Histogram:
    """Prometheus-style histogram: per-bucket counts (+Inf last), sum, count. Observations are
    binned in bulk when the histogram is read (or every few thousand), not one call each.

    ``records`` and ``value``: a list the owner appends to anyway (finished requests, first
    tokens) and the observation each new record makes (None: none); they are binned, in order,
    when the histogram is read, so recording costs nothing until someone reads it."""

    __slots__ = ("bounds", "_counts", "_sum", "_count", "_pv", "_pn", "_records", "_value",
                 "_seen")

    def __init__(self, bounds: tuple[float, ...], records: list | None = None,
                 value: Callable[[Any], float | None] | None = None) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._count = 0
        # observations not binned yet: values and their counts (the engine appends to these)
        self._pv: list[float] = []
        self._pn: list[int] = []
        self._records = records
        self._value = value
        self._seen = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Count ``n`` observations of ``value`` (binned in bulk when read)."""
        self._pv.append(value)
        self._pn.append(n)
        if len(self._pv) >= BIN_EVERY:
            self._bin()

    def _bin(self) -> None:
        counts, bounds, pv, pn = self._counts, self.bounds, self._pv, self._pn
        tot, cnt = 0.0, 0
        if len(pv) < 64:
            for v, n in zip(pv, pn, strict=True):
                counts[bisect_left(bounds, v)] += n
                tot += v * n
                cnt += n
        else:       # the same counts and, summed in the same order, the same sum
            va = np.array(pv, dtype=float)
            na = np.array(pn, dtype=float)
            per = np.bincount(np.searchsorted(bounds, va, side="left"), weights=na,
                              minlength=len(counts))
            for i in np.flatnonzero(per).tolist():
                counts[i] += int(per[i])
            tot = float(np.cumsum(va * na)[-1])
            cnt = int(na.sum())
        self._sum += tot
        self._count += cnt
        pv.clear()
        pn.clear()

    def _flush(self) -> None:
        recs, value = self._records, self._value
        if recs is not None and value is not None and self._seen < len(recs):
            observe = self.observe
            for i in range(self._seen, len(recs)):
                v = value(recs[i])
                if v is not None:
                    observe(v)
            self._seen = len(recs)
        self._bin()

    @property
    def counts(self) -> list[int]:
        """Observations per bucket (the last: above every bound)."""
        self._flush()
        return self._counts

    @property
    def sum(self) -> float:
        """Sum of the observed values."""
        self._flush()
        return self._sum

    @property
    def count(self) -> int:
        """Number of observations."""
        self._flush()
        return self._count

    def cumulative(self) -> tuple[int, ...]:
        """Cumulative bucket counts, Prometheus-style (``le`` buckets then ``+Inf``)."""
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return tuple(out)


def _result_factory() -> Callable[..., RequestResult]:
    """A constructor of `RequestResult` from its fields in declaration order. Filling the slots
    directly costs a third of the keyword-argument ``__init__`` of a frozen dataclass (one
    result per finished request: the engine's most frequent allocation); it is used only while
    the class has exactly the fields below and no ``__post_init__``, else the real ``__init__``
    is called."""
    names = ("request_id", "arrival_s", "prompt_tokens", "output_tokens", "first_token_s",
             "finish_s", "preemptions")
    cls = RequestResult
    slots = getattr(cls, "__slots__", ())
    if tuple(f.name for f in dataclasses.fields(cls)) != names or tuple(slots) != names \
            or hasattr(cls, "__post_init__"):
        def make(*values: Any) -> RequestResult:
            return cls(**dict(zip(names, values, strict=True)))
        return make
    new = object.__new__
    s0, s1, s2, s3, s4, s5, s6 = (cls.__dict__[n].__set__ for n in names)

    def make_fast(rid: int, arrival_s: float, prompt: int, output: int, first_s: float,
                  finish_s: float, preemptions: int) -> RequestResult:
        r = new(cls)
        s0(r, rid)
        s1(r, arrival_s)
        s2(r, prompt)
        s3(r, output)
        s4(r, first_s)
        s5(r, finish_s)
        s6(r, preemptions)
        return r
    return make_fast


_request_result = _result_factory()


_rid = attrgetter("rid")


def _chunk(s: _Seq, budget: int, free: int) -> int:
    """Prefill tokens of ``s`` this step; a chunk that completes the prompt also needs a KV
    slot for the first generated token."""
    c = min(s.need - s.done, budget, free)
    if s.done + c >= s.need and c >= free:
        c = free - 1
    return c


def _e2e_s(r: RequestResult) -> float:
    return r.finish_s - r.arrival_s


def _tpot_s(r: RequestResult) -> float | None:
    out = r.output_tokens
    return (r.finish_s - r.first_token_s) / (out - 1) if out > 1 else None


class _Seq:
    __slots__ = ("rid", "arrival_s", "prompt", "output", "need", "done", "gen", "d0", "first_s",
                 "preempt", "fin", "state", "win")

    def __init__(self, r: Request) -> None:
        self.rid = r.request_id
        self.arrival_s = float(r.arrival_s)
        self.prompt = int(r.prompt_tokens)
        self.output = int(r.output_tokens)
        self.need = self.prompt        # tokens to prefill (prompt, + generated after preemption)
        self.done = 0                  # tokens prefilled so far
        self.gen = 0                   # tokens generated (as of decode step d0 when decoding)
        self.d0 = 0
        self.first_s: float | None = None
        self.preempt = 0
        self.fin = 0
        self.state = _PENDING
        self.win = 0                   # KV of its sliding-window layers (full-layer tokens)


class Engine:
    """The engine and the GPU group's clock, energy and counters (ground truth, no noise)."""

    def __init__(self, gm: GroupModel, *, max_batch: int, power_cap_w: float,
                 max_num_batched_tokens: int = 8192) -> None:
        self.gm = gm
        self.n_gpus = gm.num_gpus
        self.max_batch = int(max_batch)
        self.cap_set_w = float(power_cap_w)
        self.cap_eff_w = float(power_cap_w)
        self.mnbt = int(max_num_batched_tokens)
        self.kv_cap = gm.kv_capacity_tokens
        self.kv_watermark = int(0.01 * self.kv_cap)   # free KV kept back when admitting
        # sliding-window layers keep up to the window per sequence; a running sequence holds
        # min(its final length, window) of them (in tokens of the full-attention layers)
        self._win_w = gm.model.sliding_window if gm.kv_seq_tokens else 0
        self._win_ratio = gm.kv_seq_tokens / self._win_w if self._win_w else 0.0
        self._kv_win = 0
        self.t = 0.0                    # engine clock: end of the last simulated segment
        self.seg_start = 0.0            # start of the last segment
        self.seg_power_w = gm.idle_w * self.n_gpus   # total power during the last segment
        self.seg_clock = gm.r_min
        # grid indices of the last throttled clocks, by caller (first guesses)
        self._clock_k = [_GRID_N // 2] * 4
        self.energy_j = 0.0             # cumulative, through self.t
        self.clock_int = 0.0            # ∫ r dt
        self.gen_tokens = 0
        self.prompt_tokens = 0
        self.arrived = 0
        self.finished = 0
        self.rejected = 0
        self.rejected_ids: set[int] = set()
        self._order = 0
        # submitted requests not yet arrived: (arrival_s, order, seq) from index _pend_head on,
        # sorted unless _pend_sorted is False (a submission out of arrival order)
        self._pending: list = []
        self._pend_head = 0
        self._pend_sorted = True
        self._next_arrival = math.inf
        self.waiting: deque[_Seq] = deque()
        self.running: dict[int, _Seq] = {}   # admission order
        self._pref: dict[int, _Seq] = {}     # running, prefilling
        self.dstep = 0
        self.dec_n = 0
        self._dec_ctx_base = 0
        self._kv_pref = 0
        # decoding sequences by the step that generates their last token: a heap of those
        # steps and a list per step (sequences preempted since are skipped when it comes)
        self._fin_keys: list[int] = []
        self._fin_at: dict[int, list[_Seq]] = {}
        self.seqs: dict[int, _Seq] = {}
        self.done_tokens: dict[int, int] = {}
        self.results: list[RequestResult] = []
        self.first_token_events: list[tuple[float, float]] = []   # (time, ttft)
        self.ttft_hist = Histogram(TTFT_BUCKETS_S, self.first_token_events, itemgetter(1))
        self.itl_hist = Histogram(ITL_BUCKETS_S)
        self.tpot_hist = Histogram(ITL_BUCKETS_S, self.results, _tpot_s)
        self.e2e_hist = Histogram(E2E_BUCKETS_S, self.results, _e2e_s)
        self.preemptions = 0
        # energy history for windowed averages: (t_end, energy_end, t_start, power) of every
        # segment; only the last HISTORY_S seconds (plus the segment before) are looked at
        self._hist: list = []

    # ---- state -------------------------------------------------------------------------
    @property
    def kv_used(self) -> int:
        """KV-cache tokens in use."""
        return self._dec_ctx_base + self.dec_n * self.dstep + self._kv_pref + self._kv_win

    def submit(self, req: Request) -> bool:
        """Queue a request; False (rejected) when it can never fit the KV cache."""
        if req.request_id in self.seqs or req.request_id in self.done_tokens \
                or req.request_id in self.rejected_ids:
            raise ValueError(f"duplicate request_id {req.request_id}")
        s = _Seq(req)
        if self._win_w:
            s.win = math.ceil(min(s.prompt + s.output, self._win_w) * self._win_ratio)
        if s.prompt + s.output + s.win > self.kv_cap:
            self.rejected += 1                 # vLLM refuses a request longer than the cache
            self.rejected_ids.add(s.rid)
            return False
        self.seqs[s.rid] = s
        self._order += 1
        p = self._pending
        a = s.arrival_s
        if len(p) > self._pend_head and a < p[-1][0]:
            self._pend_sorted = False
        p.append((a, self._order, s))
        if a < self._next_arrival:
            self._next_arrival = a
        return True

    def progress(self, rid: int) -> tuple[int, bool]:
        """Tokens generated so far for request ``rid`` and whether it has finished."""
        if rid in self.done_tokens:
            return self.done_tokens[rid], True
        s = self.seqs[rid]
        if s.state == _DEC:
            return s.gen + self.dstep - s.d0, False
        return s.gen, False

    def energy_at(self, t: float) -> float:
        """Cumulative energy (J, all GPUs) at time ``t`` ≤ engine clock (piecewise linear over
        the segments that ended in the last ``HISTORY_S`` and the one before them; earlier at
        idle power)."""
        if t >= self.t:
            return self.energy_j
        e_end, t_end = self.energy_j, self.t
        horizon = self.t - HISTORY_S
        h = self._hist
        i = len(h) - 1
        while i >= 0:
            te, ee, ts, p = h[i]
            if t >= ts:
                return ee - p * (te - t)
            e_end, t_end = ee - p * (te - ts), ts
            if te < horizon:        # older segments are out of the history
                break
            i -= 1
        return max(0.0, e_end - self.gm.idle_w * self.n_gpus * (t_end - t))

    def clock_at(self, t: float) -> float:
        """∫ r dt at time ``t`` ≤ engine clock."""
        return self.clock_int - self.seg_clock * max(0.0, self.t - max(t, self.seg_start))

    # ---- simulation ----------------------------------------------------------------------
    def _segment(self, dt: float, power_w: float, r: float) -> None:
        t0 = self.t
        self.seg_start = t0
        self.t = t = t0 + dt
        self.energy_j = e = self.energy_j + power_w * dt
        self.clock_int += r * dt
        self.seg_power_w, self.seg_clock = power_w, r
        h = self._hist
        h.append((t, e, t0, power_w))
        if len(h) > HISTORY_TRIM:
            self._trim_history()
        if self.cap_eff_w != self.cap_set_w:
            self._settle_cap(dt)

    def _settle_cap(self, dt: float) -> None:
        """The limit in force approaches the one set (first order, ``CAP_SETTLE_TAU_S``)."""
        d = (self.cap_eff_w - self.cap_set_w) * math.exp(-dt / CAP_SETTLE_TAU_S)
        self.cap_eff_w = self.cap_set_w if abs(d) < 0.5 else self.cap_set_w + d

    def _trim_history(self) -> None:
        """Forget the segments `energy_at` no longer looks at."""
        h = self._hist
        j = bisect_left(h, self.t - HISTORY_S, key=itemgetter(0))   # first ending in the window
        if j > 1:
            del h[:j - 1]

    def _arrive(self) -> None:
        """Move the requests that have arrived by the engine clock to the waiting queue."""
        p = self._pending
        i = self._pend_head
        if not self._pend_sorted:
            p[:] = sorted(p[i:])
            i = 0
            self._pend_sorted = True
        t = self.t
        n = len(p)
        k = n if p[-1][0] <= t else bisect_right(p, t, lo=i, key=itemgetter(0))
        w = self.waiting
        for j in range(i, k):
            s = p[j][2]
            s.state = _WAIT
            w.append(s)
        self.arrived += k - i
        if k == n:
            p.clear()
            k = 0
        elif k > 4096 and 2 * k > n:
            del p[:k]
            k = 0
        self._pend_head = k
        self._next_arrival = p[k][0] if p else math.inf

    def _finish(self, done: list[_Seq]) -> None:
        """Retire finished sequences (their counters are already final), in order."""
        running, seqs, tokens, results = self.running, self.seqs, self.done_tokens, self.results
        make, now = _request_result, self.t
        kv_win = self._kv_win
        for s in done:
            s.state = _DONE
            rid = s.rid
            del running[rid]
            kv_win -= s.win
            del seqs[rid]
            out = tokens[rid] = s.output
            # the TPOT and end-to-end histograms are binned from the results when read
            results.append(make(rid, s.arrival_s, s.prompt, out, s.first_s, now, s.preempt))
        self._kv_win = kv_win
        self.finished += len(done)

    def _process_finishes(self) -> None:
        """Retire the decoding sequences whose last token was generated by step ``dstep``."""
        keys, at, d = self._fin_keys, self._fin_at, self.dstep
        pop = heapq.heappop
        n, ctx = self.dec_n, self._dec_ctx_base
        done = []
        while keys and keys[0] <= d:
            fin = pop(keys)
            for s in at.pop(fin):           # in request-id order
                if s.state != _DEC or s.fin != fin:
                    continue            # preempted since
                n -= 1
                ctx -= s.prompt + s.gen - s.d0
                s.gen = s.output
                done.append(s)
        self.dec_n, self._dec_ctx_base = n, ctx
        self._finish(done)

    def _preempt_last(self) -> None:
        rid = next(reversed(self.running))
        s = self.running.pop(rid)
        self._kv_win -= s.win
        if s.state == _DEC:
            g = s.gen + self.dstep - s.d0
            self.dec_n -= 1
            self._dec_ctx_base -= s.prompt + s.gen - s.d0
            s.gen = g
        else:
            del self._pref[rid]
            self._kv_pref -= s.done
        s.need = s.prompt + s.gen
        s.done = 0
        s.state = _WAIT
        s.preempt += 1
        self.preemptions += 1
        self.waiting.appendleft(s)

    def _firmware_clock(self, cost, n: int = 1, slot: int = 0) -> float:
        """Clock ratio for the next ``n`` steps of cost ``cost``: the highest one that keeps the
        power averaged over the trailing ``FW_WINDOW_S`` (including these steps) within the
        limit in force. Short bursts above the cap borrow slack from a quieter recent past.
        ``slot``: which of the callers' last answers to start the search from."""
        t1, p1 = self.gm.time_power(cost, 1.0)
        if p1 <= self.cap_eff_w:
            return 1.0
        return self._throttled_clock(cost, n, slot, t1)

    def _throttled_clock(self, cost, n: int, slot: int = 0, t1: float = -1.0) -> float:
        """`_firmware_clock` once the step's power at the max clock exceeds the cap.

        The firmware's answer is the highest point of a fixed grid of clock ratios (the points
        16 halvings of [r_min, 1] can end on, `_clock_grid`) whose power fits: the window's
        energy would stay within the cap, and a stretch longer than the window would hold the
        cap itself. Where that test is monotone in the clock the point is found by
        `_grid_search` from the caller's last answer: mostly 2-4 power evaluations instead of
        the bisection's 18, and the same point. It is monotone unless a stretch that is longer than
        the window at low clocks and shorter at high ones runs over the cap at a clock below
        the answer while still longer than the window; there `_throttled_clock_bisect`
        answers. ``t1``: the step's time at the max clock, if the caller has it.
        """
        gm = self.gm
        cap = self.cap_eff_w
        ws = self.t - FW_WINDOW_S
        if ws < 0.0:
            ws = 0.0
        e_win = (self.energy_j - self.energy_at(ws)) / self.n_gpus
        t_win = self.t - ws
        step_time, power = gm.step_time, gm.power_per_gpu
        lo_r = gm.r_min
        grid = _clock_grid(lo_r)
        if t1 < 0.0:
            t1 = step_time(cost, 1.0)                # the step's time at the max clock
        hold_cap = t1 * n > FW_WINDOW_S               # longer than the window at every clock

        time_power = gm.time_power

        def excess(r: float) -> float:
            """Energy over the cap's allowance in the window, J (fits iff <= 0); for a stretch
            longer than the window at every clock, also its own excess over the cap."""
            t, p = time_power(cost, r)
            t *= n
            m = (e_win + p * t) - cap * (t_win + t)
            if hold_cap:
                over = (p - cap) * t
                if over > m:
                    return over
            return m

        a = _grid_search(grid, excess, self._clock_k[slot])
        if a < 0:
            return lo_r
        self._clock_k[slot] = a
        if not hold_cap and step_time(cost, lo_r) * n > FW_WINDOW_S \
                and power(cost, grid[a]) > cap:
            # the points up to the answer must each be short or hold the cap: the ones that
            # hold it are those up to k_p, the short ones those from some point on
            k_p = _grid_search(grid, lambda r: power(cost, r) - cap, a)
            if step_time(cost, grid[k_p + 1]) * n > FW_WINDOW_S:
                return self._throttled_clock_bisect(cost, n, e_win, t_win)
        return grid[a]

    def _throttled_clock_bisect(self, cost, n: int, e_win: float, t_win: float) -> float:
        """The firmware's clock by plain bisection (16 halvings of [r_min, 1])."""
        gm = self.gm
        cap = self.cap_eff_w

        def fits(r: float) -> bool:
            t = gm.step_time(cost, r) * n
            p = gm.power_per_gpu(cost, r)
            # a stretch longer than the window must itself hold the cap (no slack to borrow)
            return e_win + p * t <= cap * (t_win + t) and (t <= FW_WINDOW_S or p <= cap)

        if fits(1.0):
            return 1.0
        lo, hi = gm.r_min, 1.0
        if not fits(lo):
            return lo
        for _ in range(_GRID_HALVINGS):
            mid = 0.5 * (lo + hi)
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def _leap(self, t_limit: float) -> bool:
        """Leap over identical decode steps; False when the state does not allow it."""
        n = self.dec_n
        if self._pref or not n:
            return False
        kv_free = self.kv_cap - (self._dec_ctx_base + n * self.dstep + self._kv_pref
                                 + self._kv_win)
        room = len(self.running) < self.max_batch
        if room and self.waiting and kv_free - n > 0:
            return False       # an admission would happen at the next step
        k_max = self._fin_keys[0] - self.dstep
        k_kv = kv_free // n
        if k_kv < k_max:
            k_max = k_kv
        if k_max < 2:
            return False
        if room and self._next_arrival < t_limit:
            t_limit = self._next_arrival
        if self.cap_eff_w != self.cap_set_w:
            t_limit = min(t_limit, self.t + 0.25 * CAP_SETTLE_TAU_S)
        T = t_limit - self.t
        gm = self.gm
        ctx0 = self._dec_ctx_base + n * self.dstep
        ctx1 = ctx0 + n * (k_max - 1)
        # the cost is affine in the context per kernel (only attention changes), its roofline
        # time and power are not: the clock must fit the cap at both ends and in the middle
        parts = gm.max_clock_parts(n + 0.0, n + 0.0)
        ma0, ta0 = gm.attention_s(n, ctx0)
        ma1, ta1 = gm.attention_s(n, ctx1)
        tp = gm.time_power_parts
        t0, p0 = tp(parts, ma0, ta0)
        t1, p1 = tp(parts, ma1, ta1)
        cap = self.cap_eff_w
        ends: tuple[StepCost, StepCost] | None = None     # StepCosts, when throttled
        if p0 <= cap and p1 <= cap and tp(parts, 0.5 * (ma0 + ma1), 0.5 * (ta0 + ta1))[1] <= cap:
            r = 1.0
        else:
            ends = c0, c1 = gm.step_cost(n, ctx0), gm.step_cost(n, ctx1)
            ch = StepCost(*[0.5 * (a + b) for a, b in zip(c0, c1, strict=True)])
            r = min(self._firmware_clock(c0, k_max, 0), self._firmware_clock(c1, k_max, 1),
                    self._firmware_clock(ch, k_max, 2))
            t0 = gm.step_time(c0, r)
            t1 = gm.step_time(c1, r)
        slope = (t1 - t0) / (k_max - 1)
        # smallest k with k*t0 + slope*k*(k-1)/2 >= T  (the step crossing T ends the leap)
        if T <= t0:
            k = 1
        elif slope <= 1e-15:
            k = math.ceil(T / t0)
        else:
            a, b = 0.5 * slope, t0 - 0.5 * slope
            k = math.ceil((-b + math.sqrt(b * b + 4.0 * a * T)) / (2.0 * a))
        if k > k_max:
            k = k_max
        if k < 1:
            k = 1
        dur = k * t0 + slope * k * (k - 1) * 0.5
        f = 0.5 * (k - 1) / (k_max - 1)     # mid-leap cost (the cost is affine in context)
        if ends is None:
            p = tp(parts, ma0 + f * (ma1 - ma0), ta0 + f * (ta1 - ta0))[1]
        else:
            cm = StepCost(*[a + f * (b - a) for a, b in zip(*ends, strict=True)])
            p = gm.power_per_gpu(cm, r)
        self._segment(dur, p * self.n_gpus, r)
        self.dstep += k
        self.gen_tokens += n * k
        self.itl_hist.observe(dur / k, n * k)
        self._process_finishes()
        return True

    def run_until(self, t_target: float) -> None:
        """Simulate until the engine clock reaches ``t_target`` (the last step may end later).

        Each pass: arrivals; a leap over identical decode steps when the state allows one;
        otherwise one general step (decode tokens of the running sequences, prefill chunks,
        admissions); otherwise idle until the next arrival or the target."""
        gm = self.gm
        time_power = gm.time_power_max_clock
        n_gpus = self.n_gpus
        running, pref, w = self.running, self._pref, self.waiting
        fin_keys, fin_at = self._fin_keys, self._fin_at
        kv_cap, mnbt, reserve, max_batch = self.kv_cap, self.mnbt, self.kv_watermark, \
            self.max_batch
        first_tokens, itl = self.first_token_events, self.itl_hist
        itl_v, itl_n = itl._pv, itl._pn
        hist = self._hist
        push = heapq.heappush
        while self.t < t_target:
            if self._next_arrival <= self.t:
                self._arrive()
            n_dec = self.dec_n
            dstep = self.dstep
            ctx = self._dec_ctx_base + n_dec * dstep
            kv_free = kv_cap - (ctx + self._kv_pref + self._kv_win)
            if n_dec and not pref and not (w and len(running) < max_batch and kv_free > n_dec) \
                    and self._leap(t_target):
                continue
            # ---- one general step -----------------------------------------------------------
            preempted = False
            if kv_free < n_dec:             # the KV cache cannot hold the next decode tokens
                while running and self.kv_used + self.dec_n > kv_cap:
                    self._preempt_last()
                    preempted = True
                n_dec = self.dec_n
                ctx = self._dec_ctx_base + n_dec * dstep
                kv_free = kv_cap - (ctx + self._kv_pref + self._kv_win)
            budget = mnbt - n_dec
            free = kv_free - n_dec
            # prefill chunks (seq, tokens) of the prefilling sequences, then of admissions; a
            # chunk that completes the prompt also needs a KV slot for the first token
            chunks: list[tuple[_Seq, int]] = []
            n_pref = pattn = pkv = 0
            for s in pref.values():
                if budget <= 0 or free <= 0:
                    break
                c = _chunk(s, budget, free)
                if c <= 0:
                    break
                need, d = s.need, s.done
                chunks.append((s, c))
                budget -= c
                free -= c + (d + c >= need)
                n_pref += c
                pattn += c * d + c * (c + 1) // 2
                pkv += d + c
            if w and not preempted:
                room = max_batch - len(running)
                kv_win = self._kv_win
                while w and room > 0 and budget > 0 and free > 0:
                    # admit only when the whole prompt fits above a watermark (as vLLM's block
                    # manager does); admitting into the last free slots only to preempt the
                    # newcomer at the next decode step would thrash
                    s = w[0]
                    need, d, win = s.need, s.done, s.win
                    if need - d + 1 + win > free - reserve:
                        break
                    f = free - win
                    c = need - d            # _chunk(s, budget, f), inline
                    if budget < c:
                        c = budget
                    if f < c:
                        c = f
                    if d + c >= need and c >= f:
                        c = f - 1
                    if c <= 0:
                        break
                    w.popleft()
                    s.state = _PREF
                    running[s.rid] = s
                    kv_win += win
                    pref[s.rid] = s
                    chunks.append((s, c))
                    room -= 1
                    budget -= c
                    free = f - c - (d + c >= need)
                    n_pref += c
                    pattn += c * d + c * (c + 1) // 2
                    pkv += d + c
                self._kv_win = kv_win
            if not n_dec and not chunks:
                # nothing runnable: idle until the next arrival or the target
                t_next = t_target
                if self._next_arrival < t_next:
                    t_next = self._next_arrival
                self._segment(max(t_next - self.t, 1e-9), gm.idle_w * n_gpus, gm.r_min)
                continue
            dt, p1 = time_power(n_dec, ctx, n_pref, pattn, pkv, len(chunks))
            if p1 <= self.cap_eff_w:        # the firmware's common case: no throttling
                r = 1.0
            else:
                cost = gm.step_cost(n_dec, ctx, n_pref, pattn, pkv, len(chunks))
                r = self._throttled_clock(cost, 1, 3)
                dt, p1 = gm.time_power(cost, r)
            # self._segment(dt, p1 * n_gpus, r), inline
            pw = p1 * n_gpus
            t0 = self.t
            self.seg_start = t0
            self.t = now = t0 + dt
            self.energy_j = e = self.energy_j + pw * dt
            self.clock_int += r * dt
            self.seg_power_w, self.seg_clock = pw, r
            hist.append((now, e, t0, pw))
            if len(hist) > HISTORY_TRIM:
                self._trim_history()
            if self.cap_eff_w != self.cap_set_w:
                self._settle_cap(dt)
            self.dstep = dstep = dstep + 1
            gen = self.gen_tokens + n_dec
            self.prompt_tokens += n_pref
            if n_dec:
                itl_v.append(dt)        # itl.observe(dt, n_dec), inline
                itl_n.append(n_dec)
                if len(itl_v) >= BIN_EVERY:
                    itl._bin()
            if chunks:
                kv_pref = self._kv_pref
                base = self._dec_ctx_base
                done = []
                for s, c in chunks:
                    d = s.done
                    if d + c < s.need:
                        s.done = d + c
                        kv_pref += c
                        continue
                    del pref[s.rid]         # prefilled: its KV counts with the decoders'
                    kv_pref -= d
                    s.done = 0
                    if s.first_s is None:
                        s.first_s = now
                        # the TTFT histogram is binned from these events when read
                        first_tokens.append((now, now - s.arrival_s))
                    g = s.gen = s.gen + 1
                    gen += 1
                    if g >= s.output:
                        done.append(s)
                    else:               # enters decode
                        s.state = _DEC
                        s.d0 = dstep
                        s.fin = fin = dstep + (s.output - g)
                        n_dec += 1
                        base += s.prompt + g - dstep
                        at_fin = fin_at.get(fin)
                        if at_fin is None:
                            fin_at[fin] = [s]
                            push(fin_keys, fin)
                        elif s.rid > at_fin[-1].rid:
                            at_fin.append(s)
                        else:
                            insort(at_fin, s, key=_rid)
                self._kv_pref = kv_pref
                self.dec_n = n_dec
                self._dec_ctx_base = base
                if done:
                    self._finish(done)
            self.gen_tokens = gen
            if fin_keys and fin_keys[0] <= dstep:
                self._process_finishes()
        if len(self._hist) > 512:       # keep a few hundred segments between calls
            self._trim_history()
