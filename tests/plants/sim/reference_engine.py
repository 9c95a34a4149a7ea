"""Reference: the simulated engine as it was before its step path was rewritten for speed
(palsctl/plants/sim/engine.py at commit 18f10f1), kept verbatim apart from this docstring, lint
fixes and `reference_plant` at the end, so that tests can check that the fast engine reproduces
it.

Do not optimise this file: it is the yardstick. When the engine's behaviour changes on purpose,
change this file the same way (or retire the equivalence test with the reason).
"""
from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections import deque

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
_DEC, _PREF, _WAIT, _PENDING, _DONE = 0, 1, 2, 3, 4


class Histogram:
    """Prometheus-style histogram: per-bucket counts (+Inf last), sum, count. Observations are
    binned in bulk when the histogram is read (or every few thousand), not one call each."""

    __slots__ = ("bounds", "_counts", "_sum", "_count", "_pending")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._sum = 0.0
        self._count = 0
        self._pending: list[tuple[float, int]] = []

    def observe(self, value: float, n: int = 1) -> None:
        self._pending.append((value, n))
        if len(self._pending) >= 4096:
            self._flush()

    def _flush(self) -> None:
        counts, bounds = self._counts, self.bounds
        tot = cnt = 0
        for v, n in self._pending:
            counts[bisect_left(bounds, v)] += n
            tot += v * n
            cnt += n
        self._sum += tot
        self._count += cnt
        self._pending.clear()

    @property
    def counts(self) -> list[int]:
        self._flush()
        return self._counts

    @property
    def sum(self) -> float:
        self._flush()
        return self._sum

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    def cumulative(self) -> tuple[int, ...]:
        out, acc = [], 0
        for c in self.counts:
            acc += c
            out.append(acc)
        return tuple(out)


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
        self.energy_j = 0.0             # cumulative, through self.t
        self.clock_int = 0.0            # ∫ r dt
        self.gen_tokens = 0
        self.prompt_tokens = 0
        self.arrived = 0
        self.finished = 0
        self.rejected = 0
        self.rejected_ids: set[int] = set()
        self._order = 0
        self._pending: list = []        # heap (arrival_s, order, seq)
        self.waiting: deque[_Seq] = deque()
        self.running: dict[int, _Seq] = {}   # admission order
        self._pref: dict[int, _Seq] = {}     # running, prefilling
        self.dstep = 0
        self.dec_n = 0
        self._dec_ctx_base = 0
        self._kv_pref = 0
        self._fin_heap: list = []
        self.seqs: dict[int, _Seq] = {}
        self.done_tokens: dict[int, int] = {}
        self.results: list[RequestResult] = []
        self.first_token_events: list[tuple[float, float]] = []   # (time, ttft)
        self.ttft_hist = Histogram(TTFT_BUCKETS_S)
        self.itl_hist = Histogram(ITL_BUCKETS_S)
        self.tpot_hist = Histogram(ITL_BUCKETS_S)
        self.e2e_hist = Histogram(E2E_BUCKETS_S)
        self.preemptions = 0
        # energy history for windowed averages: (t_end, energy_end, t_start, power)
        self._hist: deque = deque()

    # ---- state -------------------------------------------------------------------------
    @property
    def kv_used(self) -> int:
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
        heapq.heappush(self._pending, (s.arrival_s, self._order, s))
        return True

    def progress(self, rid: int) -> tuple[int, bool]:
        if rid in self.done_tokens:
            return self.done_tokens[rid], True
        s = self.seqs[rid]
        if s.state == _DEC:
            return s.gen + self.dstep - s.d0, False
        return s.gen, False

    def energy_at(self, t: float) -> float:
        """Cumulative energy (J, all GPUs) at time ``t`` ≤ engine clock (piecewise linear)."""
        if t >= self.t:
            return self.energy_j
        e_end, t_end = self.energy_j, self.t
        for (te, ee, ts, p) in reversed(self._hist):
            if t >= ts:
                return ee - p * (te - t)
            e_end, t_end = ee - p * (te - ts), ts
        return max(0.0, e_end - self.gm.idle_w * self.n_gpus * (t_end - t))

    def clock_at(self, t: float) -> float:
        """∫ r dt at time ``t`` ≤ engine clock."""
        return self.clock_int - self.seg_clock * max(0.0, self.t - max(t, self.seg_start))

    # ---- simulation ----------------------------------------------------------------------
    def _segment(self, dt: float, power_w: float, r: float) -> None:
        self.seg_start = self.t
        self.t += dt
        self.energy_j += power_w * dt
        self.clock_int += r * dt
        self.seg_power_w, self.seg_clock = power_w, r
        h = self._hist
        h.append((self.t, self.energy_j, self.seg_start, power_w))
        while len(h) > 2 and h[1][0] < self.t - 2.5:
            h.popleft()
        if self.cap_eff_w != self.cap_set_w:
            d = (self.cap_eff_w - self.cap_set_w) * math.exp(-dt / CAP_SETTLE_TAU_S)
            self.cap_eff_w = self.cap_set_w if abs(d) < 0.5 else self.cap_set_w + d

    def _arrive(self) -> None:
        p, t = self._pending, self.t
        while p and p[0][0] <= t:
            s = heapq.heappop(p)[2]
            s.state = _WAIT
            self.waiting.append(s)
            self.arrived += 1

    def _enter_decode(self, s: _Seq) -> None:
        s.state = _DEC
        s.d0 = self.dstep
        s.fin = self.dstep + (s.output - s.gen)
        self.dec_n += 1
        self._dec_ctx_base += s.prompt + s.gen - s.d0
        heapq.heappush(self._fin_heap, (s.fin, s.rid, s))

    def _finish(self, s: _Seq) -> None:
        s.state = _DONE
        rid = s.rid
        del self.running[rid]
        self._kv_win -= s.win
        del self.seqs[rid]
        out = s.output
        self.done_tokens[rid] = out
        self.finished += 1
        now = self.t
        self.results.append(RequestResult(
            request_id=rid, arrival_s=s.arrival_s, prompt_tokens=s.prompt, output_tokens=out,
            first_token_s=s.first_s, finish_s=now, preemptions=s.preempt))
        self.e2e_hist.observe(now - s.arrival_s)
        if out > 1:
            self.tpot_hist.observe((now - s.first_s) / (out - 1))

    def _process_finishes(self) -> None:
        h, d = self._fin_heap, self.dstep
        while h and h[0][0] <= d:
            fin, _, s = heapq.heappop(h)
            if s.state != _DEC or s.fin != fin:
                continue
            self.dec_n -= 1
            self._dec_ctx_base -= s.prompt + s.gen - s.d0
            s.gen = s.output
            self._finish(s)

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

    def _firmware_clock(self, cost, n: int = 1) -> float:
        """Clock ratio for the next ``n`` steps of cost ``cost``: the highest one that keeps the
        power averaged over the trailing ``FW_WINDOW_S`` (including these steps) within the
        limit in force. Short bursts above the cap borrow slack from a quieter recent past."""
        gm = self.gm
        if gm.power_per_gpu(cost, 1.0) <= self.cap_eff_w:
            return 1.0
        return self._throttled_clock(cost, n)

    def _throttled_clock(self, cost, n: int) -> float:
        """`_firmware_clock` once the step's power at the max clock exceeds the cap."""
        gm = self.gm
        cap = self.cap_eff_w
        ws = self.t - FW_WINDOW_S
        if ws < 0.0:
            ws = 0.0
        e_win = (self.energy_j - self.energy_at(ws)) / self.n_gpus
        t_win = self.t - ws

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
        for _ in range(16):
            mid = 0.5 * (lo + hi)
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    @staticmethod
    def _chunk(s: _Seq, budget: int, free: int) -> int:
        """Prefill tokens of ``s`` this step; a chunk that completes the prompt also needs a
        KV slot for the first generated token."""
        c = min(s.need - s.done, budget, free)
        if s.done + c >= s.need and c >= free:
            c = free - 1
        return c

    def _general_step(self) -> bool:
        """One engine step with prefill/admission; False when there is nothing to do."""
        preempted = False
        running = self.running
        while running and self.kv_used + self.dec_n > self.kv_cap:
            self._preempt_last()
            preempted = True
        n_dec = self.dec_n
        budget = self.mnbt - n_dec
        free = self.kv_cap - self.kv_used - n_dec
        chunks: list[tuple[_Seq, int]] = []
        pref = self._pref
        chunk = self._chunk
        for s in pref.values():
            if budget <= 0 or free <= 0:
                break
            c = chunk(s, budget, free)
            if c <= 0:
                break
            chunks.append((s, c))
            budget -= c
            free -= c + (s.done + c >= s.need)
        w = self.waiting
        if not preempted and w:
            reserve = self.kv_watermark
            max_batch = self.max_batch
            while w and len(running) < max_batch and budget > 0 and free > 0:
                # admit only when the whole prompt fits above a watermark (as vLLM's block
                # manager does); admitting into the last free slots only to preempt the
                # newcomer at the next decode step would thrash
                s = w[0]
                if s.need - s.done + 1 + s.win > free - reserve:
                    break
                free -= s.win
                c = chunk(s, budget, free)
                if c <= 0:
                    free += s.win
                    break
                w.popleft()
                s.state = _PREF
                running[s.rid] = s
                self._kv_win += s.win
                pref[s.rid] = s
                chunks.append((s, c))
                budget -= c
                free -= c + (s.done + c >= s.need)
        if not n_dec and not chunks:
            return False
        n_pref = pattn = pkv = 0
        for s, c in chunks:
            d = s.done
            n_pref += c
            pattn += c * d + c * (c + 1) // 2
            pkv += d + c
        gm = self.gm
        cost = gm.step_cost(n_dec, self._dec_ctx_base + n_dec * self.dstep, n_pref, pattn, pkv,
                            len(chunks))
        p1 = gm.power_per_gpu(cost, 1.0)
        if p1 <= self.cap_eff_w:        # the firmware's common case: no throttling
            r = 1.0
            dt = gm.step_time(cost, 1.0)
        else:
            r = self._throttled_clock(cost, 1)
            dt = gm.step_time(cost, r)
            p1 = gm.power_per_gpu(cost, r)
        self._segment(dt, p1 * self.n_gpus, r)
        self.dstep += 1
        self.gen_tokens += n_dec
        self.prompt_tokens += n_pref
        if n_dec:
            self.itl_hist.observe(dt, n_dec)
        now = self.t
        kv_pref = self._kv_pref
        for s, c in chunks:
            s.done += c
            kv_pref += c
            if s.done >= s.need:
                del pref[s.rid]
                kv_pref -= s.done
                s.done = 0
                if s.first_s is None:
                    s.first_s = now
                    self.first_token_events.append((now, now - s.arrival_s))
                    self.ttft_hist.observe(now - s.arrival_s)
                s.gen += 1
                self.gen_tokens += 1
                if s.gen >= s.output:
                    self._kv_pref = kv_pref
                    self._finish(s)
                else:
                    self._enter_decode(s)
        self._kv_pref = kv_pref
        if self._fin_heap and self._fin_heap[0][0] <= self.dstep:
            self._process_finishes()
        return True

    def _leap(self, t_limit: float) -> bool:
        """Leap over identical decode steps; False when the state does not allow it."""
        n = self.dec_n
        if self._pref or not n:
            return False
        w = self.waiting
        if w and len(self.running) < self.max_batch and self.kv_cap - self.kv_used - n > 0:
            return False       # an admission would happen at the next step
        k_max = self._fin_heap[0][0] - self.dstep
        k_kv = (self.kv_cap - self.kv_used) // n
        if k_kv < k_max:
            k_max = k_kv
        if k_max < 2:
            return False
        if self._pending and len(self.running) < self.max_batch and self._pending[0][0] < t_limit:
            t_limit = self._pending[0][0]
        if self.cap_eff_w != self.cap_set_w:
            t_limit = min(t_limit, self.t + 0.25 * CAP_SETTLE_TAU_S)
        T = t_limit - self.t
        gm = self.gm
        ctx0 = self._dec_ctx_base + n * self.dstep
        c0 = gm.step_cost(n, ctx0)
        c1 = gm.step_cost(n, ctx0 + n * (k_max - 1))
        # the cost is affine in the context per kernel, its roofline time and power are not:
        # the clock must fit the cap at both ends and in the middle of the leap
        ch = StepCost(*(0.5 * (a + b) for a, b in zip(c0, c1, strict=True)))
        r = min(self._firmware_clock(c0, k_max), self._firmware_clock(c1, k_max),
                self._firmware_clock(ch, k_max))
        t0 = gm.step_time(c0, r)
        slope = (gm.step_time(c1, r) - t0) / (k_max - 1)
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
        cm = StepCost(*(a + f * (b - a) for a, b in zip(c0, c1, strict=True)))
        self._segment(dur, gm.power_per_gpu(cm, r) * self.n_gpus, r)
        self.dstep += k
        self.gen_tokens += n * k
        self.itl_hist.observe(dur / k, n * k)
        self._process_finishes()
        return True

    def run_until(self, t_target: float) -> None:
        """Simulate until the engine clock reaches ``t_target`` (the last step may end later)."""
        while self.t < t_target:
            self._arrive()
            if self._leap(t_target):
                continue
            if self._general_step():
                continue
            # nothing runnable: idle until the next arrival or the target
            t_next = t_target
            if self._pending and self._pending[0][0] < t_next:
                t_next = self._pending[0][0]
            self._segment(max(t_next - self.t, 1e-9), self.gm.idle_w * self.n_gpus, self.gm.r_min)


def reference_plant(*args, **kwargs):
    """A `SimPlant` built with the same arguments whose engine is this reference engine and
    whose ``submit`` and ``read`` are those of commit 18f10f1 (the demand heap, one noise draw
    per read)."""
    import numpy as np

    from palsctl.errors import ConfigError
    from palsctl.plants.sim import plant as plant_mod
    from palsctl.types import Measurement

    class ReferencePlant(plant_mod.SimPlant):
        def submit(self, requests):
            for r in requests:
                if r.prompt_tokens < 1 or r.output_tokens < 1:
                    raise ConfigError("a request needs prompt_tokens >= 1 and output_tokens >= 1",
                                      key=f"request {r.request_id}",
                                      value=(r.prompt_tokens, r.output_tokens))
                if not math.isfinite(r.arrival_s):
                    raise ConfigError("arrival_s must be finite", key=f"request {r.request_id}",
                                      value=r.arrival_s)
                try:
                    accepted = self._eng.submit(r)
                except ValueError as exc:
                    raise ConfigError(str(exc), key="request_id", value=r.request_id) from None
                if accepted:
                    heapq.heappush(self._demand, (float(r.arrival_s), int(r.output_tokens)))

        def read(self):
            eng = self._eng
            now = self._now
            window = now - self._last_t
            e_now = eng.energy_at(now)
            clk = eng.clock_at(now)
            gen, prompt = eng.gen_tokens, eng.prompt_tokens
            demand_tok = 0
            d = self._demand
            while d and d[0][0] < now:
                demand_tok += heapq.heappop(d)[1]
            ttfts = [x[1] for x in eng.first_token_events[self._read_ttft:]]
            self._read_ttft = len(eng.first_token_events)
            tpots = [r.tpot_s for r in eng.results[self._read_res:] if r.output_tokens > 1]
            self._read_res = len(eng.results)
            if window > 0:
                power = (e_now - self._last_e) / window
                thr = (gen - self._last_gen) / window
                pthr = (prompt - self._last_prompt) / window
                dem = demand_tok / window
                clock = (clk - self._last_clock) / window * self.gpu.max_sm_clock_mhz
            else:
                power = eng.seg_power_w
                thr = pthr = dem = 0.0
                clock = eng.seg_clock * self.gpu.max_sm_clock_mhz
            if self.noise:
                power *= 1.0 + plant_mod.POWER_NOISE_FRAC * float(self._rng.standard_normal())
            self._last_t, self._last_e, self._last_clock = now, e_now, clk
            self._last_gen, self._last_prompt = gen, prompt
            return Measurement(
                t_s=now, window_s=window, power_w=max(0.0, power), energy_j=e_now,
                throughput_tok_s=thr, prompt_tok_s=pthr, demand_tok_s=dem,
                running=len(eng.running), waiting=len(eng.waiting),
                kv_usage=min(1.0, eng.kv_used / eng.kv_cap) if eng.kv_cap else 0.0,
                ttft_p90_s=plant_mod._p90(ttfts), tpot_p90_s=plant_mod._p90(tpots),
                power_cap_w=eng.cap_set_w, max_batch=eng.max_batch, sm_clock_mhz=clock)

    plant = ReferencePlant(*args, **kwargs)
    new = plant._eng
    plant._eng = Engine(new.gm, max_batch=new.max_batch, power_cap_w=new.cap_set_w,
                        max_num_batched_tokens=new.mnbt)
    plant._rng = np.random.default_rng([plant.seed, 0])
    return plant
