"""Serve the simulated plant in real time behind vLLM's HTTP interface.

`Emulator` runs a `SimPlant` on the wall clock (optionally ``speedup`` times faster) and serves:

- ``POST /v1/completions`` and ``POST /v1/chat/completions`` (OpenAI-compatible, streaming or
  not): each request enters the plant's engine with ``max_tokens`` output tokens (always
  generated in full, as with vLLM's ``ignore_eos``); streamed tokens are paced by the plant;
- ``GET /v1/models`` (the served model name), ``GET /health``;
- ``GET /metrics``: Prometheus text with vLLM's metric names (running/waiting gauges, KV usage,
  token and request counters, TTFT / inter-token / TPOT / e2e histograms with vLLM's buckets);
- ``GET /palsctl/power`` and ``POST /palsctl/power/cap``: per-GPU power (instant and 1 s
  average), energy counter, limit and constraints — a stand-in for NVML (`EmulatorPower` is the
  client: a `PowerDevice`, like `NvmlPower`). Anyone may POST a limit, as another tool or a
  driver reset changes a real GPU's; palsctl notices by reading it back;
- optionally a batch control file read like the vLLM scheduler plugin does
  (`palsctl.adapters.vllm_scheduler`), so both batch actuators can be exercised.

Prompt lengths are estimated as one token per 4 characters (a token-id list counts exactly).
A client that disconnects leaves its request running in the plant (the simulator cannot abort).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from palsctl.adapters.nvml import GpuConstraints, GpuReading, PowerDevice
from palsctl.adapters.state import DriftWatch, retry
from palsctl.adapters.vllm_scheduler import BatchTargetReader, effective_cap
from palsctl.errors import ActuatorError, ConfigError, HardwareError
from palsctl.types import Action, Request

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class EmulatorConfig:
    """``served_model_name``: the name in ``/v1/models`` and the ``model_name`` label;
    ``tick_s``: how often the plant is advanced and streams are fed (wall seconds);
    ``speedup``: plant seconds per wall second; ``default_max_tokens``: output length when a
    request gives none; ``batch_file``: optional control file for the batch target."""

    served_model_name: str = "palsctl-emulated"
    host: str = "127.0.0.1"
    port: int = 0
    tick_s: float = 0.02
    speedup: float = 1.0
    default_max_tokens: int = 16
    max_tokens_limit: int = 32768
    batch_file: str | None = None

    def __post_init__(self) -> None:
        if not (0 < self.tick_s <= 1.0):
            raise ConfigError("tick_s must be in (0, 1]", key="tick_s", value=self.tick_s)
        if not (math.isfinite(self.speedup) and 0 < self.speedup <= 1000):
            raise ConfigError("speedup must be in (0, 1000]", key="speedup", value=self.speedup)
        if not 0 <= self.port <= 65535:
            raise ConfigError("port must be in 0..65535", key="port", value=self.port)
        if self.default_max_tokens < 1:
            raise ConfigError("default_max_tokens must be >= 1", key="default_max_tokens",
                              value=self.default_max_tokens)


def estimate_prompt_tokens(prompt: Any) -> int:
    """Tokens of an OpenAI ``prompt`` (text: ~4 characters per token; token ids: exact)."""
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) for x in prompt):
            return len(prompt)
        return sum(estimate_prompt_tokens(p) for p in prompt)
    if isinstance(prompt, str):
        return max(1, round(len(prompt) / 4))
    raise ValueError("prompt must be a string, a list of strings or a list of token ids")


def _chat_prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    n = 0
    for m in messages:
        if not isinstance(m, dict):
            raise ValueError("each message must be an object")
        content = m.get("content") or ""
        if isinstance(content, list):   # content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        n += 4 + estimate_prompt_tokens(str(content))
    return n


class _VllmCollector:
    """Exposes a plant's counters with vLLM's metric names (one engine, ``engine="0"``)."""

    def __init__(self, emu: "Emulator") -> None:
        self.emu = emu

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (  # heavy, only when scraped
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        c = self.emu.plant.counters()
        labels = ["engine", "model_name"]
        lv = ["0", self.emu.config.served_model_name]

        def gauge(name: str, doc: str, value: float) -> Any:
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> Any:
            m = CounterMetricFamily(name, doc, labels=labels)
            m.add_metric(lv, value)
            return m

        def hist(name: str, doc: str, h: Any) -> Any:
            m = HistogramMetricFamily(name, doc, labels=labels)
            bounds = [repr(float(b)) for b in h.bounds_s] + ["+Inf"]
            counts = [float(x) for x in h.cumulative_counts]
            m.add_metric(lv, buckets=list(zip(bounds, counts, strict=True)),
                         sum_value=h.sum_s)
            return m

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                    c.requests_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    c.requests_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    c.kv_usage)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      c.prompt_tokens_total)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      c.generation_tokens_total)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                      c.preemptions_total)
        ok = CounterMetricFamily("vllm:request_success", "Count of successfully processed "
                                 "requests.", labels=["engine", "finished_reason", "model_name"])
        ok.add_metric(["0", "length", lv[1]], c.requests_finished_total)
        yield ok
        yield hist("vllm:time_to_first_token_seconds",
                   "Histogram of time to first token in seconds.", c.ttft_s)
        yield hist("vllm:inter_token_latency_seconds",
                   "Histogram of inter-token latency in seconds.", c.itl_s)
        yield hist("vllm:request_time_per_output_token_seconds",
                   "Histogram of time_per_output_token_seconds per request.", c.tpot_s)
        yield hist("vllm:e2e_request_latency_seconds",
                   "Histogram of e2e request latency in seconds.", c.e2e_s)


class Emulator:
    """The running emulator: ``await emu.start()`` → ``emu.url``; ``await emu.stop()``.

    ``plant``: a `SimPlant` (or any plant with ``submit/advance/now_s/progress/counters/apply``)
    whose clock starts where it is; ``clock``: wall seconds (monotonic)."""

    def __init__(self, plant: Any, config: EmulatorConfig | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.plant = plant
        self.config = config or EmulatorConfig()
        self._clock = clock
        self._next_id = 1
        self.active = 0            # HTTP requests being served (completions)
        self.max_active = 0
        self.served = 0
        self._tick_event = asyncio.Event()      # replaced by start(), set by each tick
        self._task: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._batch = BatchTargetReader(self.config.batch_file)
        self.url = ""

    # --------------------------------------------------------------- clock
    def sync(self) -> None:
        """Advance the plant to the current wall time (× speedup) and apply the batch file."""
        target = self._plant_t0 + (self._clock() - self._wall_t0) * self.config.speedup
        dt = target - self.plant.now_s
        if dt > 0:
            self.plant.advance(dt)
        if self._batch.path is not None:
            limits = self.plant.limits
            eng = getattr(self.plant, "engine", None)
            running = (len(eng.running) if eng is not None
                       else self.plant.counters().requests_running)
            cap = effective_cap(self._batch.poll(), running, limits.max_batch_max)
            self.plant.apply(Action(max_batch=cap))

    async def _ticker(self) -> None:
        tick = self.config.tick_s
        while True:
            await asyncio.sleep(tick)
            try:
                self.sync()
            except Exception:  # keep serving; the error is logged
                log.exception("emulator tick failed")
            ev, self._tick_event = self._tick_event, asyncio.Event()
            ev.set()

    async def _next_tick(self) -> None:
        await self._tick_event.wait()

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> "Emulator":
        """Listen on ``config.host``/``config.port`` (port 0: a free one) and start the ticker
        that advances the plant with the wall clock; sets `url`.

        Returns
        -------
        Emulator
            This emulator, serving.
        """
        from aiohttp import web
        from prometheus_client import CollectorRegistry

        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_VllmCollector(self))
        self._wall_t0 = self._clock()
        self._plant_t0 = self.plant.now_s
        self._tick_event = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/palsctl/power", self._power)
        app.router.add_post("/palsctl/power/cap", self._power_cap)
        # on stop, in-flight requests get 2 s to finish, then their handlers are cancelled
        self._runner = runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                              shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        h, p = runner.addresses[0][:2]
        self.url = f"http://{h}:{p}"
        self._task = asyncio.create_task(self._ticker())
        log.info("emulator serving %s on %s", self.config.served_model_name, self.url)
        return self

    async def stop(self) -> None:
        """Stop listening (in-flight requests get 2 s to finish), then stop the ticker."""
        if self._runner is not None:       # the plant keeps running while requests drain
            await self._runner.cleanup()
            self._runner = None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --------------------------------------------------------------- handlers
    async def _health(self, request: Any) -> Any:
        from aiohttp import web
        return web.Response(text="")

    async def _models(self, request: Any) -> Any:
        from aiohttp import web
        return web.json_response({"object": "list", "data": [{
            "id": self.config.served_model_name, "object": "model", "created": 0,
            "owned_by": "palsctl", "root": self.config.served_model_name,
            "max_model_len": None}]})

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        self.sync()
        return web.Response(body=generate_latest(self._registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _gpu_readings(self) -> list[dict[str, float]]:
        c = self.plant.counters()
        return [{"index": i, "power_instant_w": c.power_instant_w[i],
                 "power_avg_w": c.power_avg_1s_w[i], "energy_j": c.energy_j[i],
                 "power_limit_w": c.power_cap_w, "sm_clock_mhz": c.sm_clock_mhz}
                for i in range(len(c.energy_j))]

    def _power_state(self) -> dict[str, Any]:
        lim = self.plant.limits
        return {"gpus": self._gpu_readings(), "name": str(getattr(self.plant.info, "gpu", "")),
                "power_cap_min_w": lim.power_cap_min_w, "power_cap_max_w": lim.power_cap_max_w,
                "power_cap_default_w": lim.power_cap_default_w}

    async def _power(self, request: Any) -> Any:
        from aiohttp import web
        self.sync()
        return web.json_response(self._power_state())

    async def _power_cap(self, request: Any) -> Any:
        from aiohttp import web
        try:
            value = float((await request.json())["power_cap_w"])
            if not math.isfinite(value):
                raise ValueError("not finite")
        except (ValueError, KeyError, TypeError) as exc:
            return web.json_response({"error": f"need {{\"power_cap_w\": number}}: {exc}"},
                                     status=400)
        self.sync()
        applied = self.plant.apply(Action(power_cap_w=value))
        state = self._power_state()
        state["applied_power_cap_w"] = applied.power_cap_w
        return web.json_response(state)

    def _error(self, message: str, status: int = 400) -> Any:
        from aiohttp import web
        return web.json_response({"object": "error", "message": message,
                                  "type": "BadRequestError", "code": status}, status=status)

    async def _parse(self, request: Any, chat: bool) -> tuple[dict, int, int] | Any:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError("body must be a JSON object")
            prompt_tokens = (_chat_prompt_tokens(body.get("messages")) if chat
                             else estimate_prompt_tokens(body.get("prompt", "")))
            max_tokens = body.get("max_completion_tokens") if chat else None
            if max_tokens is None:
                max_tokens = body.get("max_tokens")
            if max_tokens is None:
                max_tokens = self.config.default_max_tokens
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or \
                    not 1 <= max_tokens <= self.config.max_tokens_limit:
                raise ValueError(f"max_tokens must be an integer in "
                                 f"[1, {self.config.max_tokens_limit}], got {max_tokens!r}")
            model = body.get("model", self.config.served_model_name)
            if model != self.config.served_model_name:
                return self._error(f"The model `{model}` does not exist.", 404)
        except (ValueError, TypeError) as exc:
            return self._error(str(exc))
        return body, prompt_tokens, max_tokens

    async def _completions(self, request: Any) -> Any:
        return await self._serve(request, chat=False)

    async def _chat(self, request: Any) -> Any:
        return await self._serve(request, chat=True)

    async def _serve(self, request: Any, *, chat: bool) -> Any:
        from aiohttp import web
        parsed = await self._parse(request, chat)
        if not isinstance(parsed, tuple):
            return parsed
        body, prompt_tokens, max_tokens = parsed
        rid = self._next_id
        self._next_id += 1
        self.sync()
        self.plant.submit([Request(request_id=rid, arrival_s=self.plant.now_s,
                                   prompt_tokens=prompt_tokens, output_tokens=max_tokens)])
        try:
            self.plant.progress(rid)
        except KeyError:
            return self._error(f"request of {prompt_tokens} prompt + {max_tokens} output tokens "
                               "does not fit the KV cache")
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            stream = bool(body.get("stream"))
            oid = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
            created = int(time.time())
            name = self.config.served_model_name
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                     "total_tokens": prompt_tokens + max_tokens}
            if not stream:
                while not self.plant.progress(rid)[1]:
                    await self._next_tick()
                text = "".join(_token_text(rid, k) for k in range(max_tokens))
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "length"}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None,
                              "finish_reason": "length"}
                self.served += 1
                return web.json_response({
                    "id": oid, "object": "chat.completion" if chat else "text_completion",
                    "created": created, "model": name, "choices": [choice], "usage": usage})
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
            await resp.prepare(request)
            obj = "chat.completion.chunk" if chat else "text_completion"

            def chunk(piece: str, finish: str | None, first: bool = False) -> bytes:
                if chat:
                    delta = {"role": "assistant", "content": piece} if first else {"content": piece}
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": piece, "finish_reason": finish}
                return ("data: " + json.dumps({"id": oid, "object": obj, "created": created,
                                               "model": name, "choices": [choice]},
                                              separators=(",", ":")) + "\n\n").encode()

            if chat:
                await resp.write(chunk("", None, first=True))
            sent = 0
            while True:
                done_tokens, finished = self.plant.progress(rid)
                if done_tokens > sent:
                    piece = "".join(_token_text(rid, k) for k in range(sent, done_tokens))
                    last = finished and done_tokens >= max_tokens
                    await resp.write(chunk(piece, "length" if last else None))
                    sent = done_tokens
                if finished:
                    break
                await self._next_tick()
            opts = body.get("stream_options") or {}
            if isinstance(opts, dict) and opts.get("include_usage"):
                await resp.write(("data: " + json.dumps({
                    "id": oid, "object": obj, "created": created, "model": name, "choices": [],
                    "usage": usage}) + "\n\n").encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            self.served += 1
            return resp
        finally:
            self.active -= 1


def _token_text(rid: int, k: int) -> str:
    return f" w{(rid * 7 + k) % 97}"


async def run_emulator(plant: Any, config: EmulatorConfig, *, duration_s: float | None = None,
                       ready: Callable[[Emulator], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM or ``duration_s`` wall seconds."""
    from palsctl.adapters.serve import serve_until_stopped
    await serve_until_stopped(Emulator(plant, config), duration_s=duration_s, ready=ready)


class EmulatorPower(PowerDevice):
    """The NVML stand-in's client: a `PowerDevice` (`Sensor` and cap `Actuator` with read-back,
    drift repair and restore, as `NvmlPower`) over the emulator's ``/palsctl/power`` endpoint.
    ``url``: the emulator's base URL; ``close`` restores the limit found at open (retries with
    backoff; `ActuatorError` when it cannot). ``clock``: monotonic seconds for the windows."""

    def __init__(self, url: str, *, dry_run: bool = False, timeout_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic, restore_attempts: int = 5,
                 restore_backoff_s: float = 0.2) -> None:
        self.url = url.rstrip("/")
        self.dry_run = dry_run
        self.timeout_s = timeout_s
        self.restore_attempts, self.restore_backoff_s = restore_attempts, restore_backoff_s
        self.drift = DriftWatch("emulated power limit")
        state = _power_call(self.url, "GET", "/palsctl/power", timeout_s=timeout_s)
        n = len(state["gpus"])
        self.indices = list(range(n))
        self.constraints = [GpuConstraints(
            index=i, name=state.get("name", ""), power_cap_min_w=state["power_cap_min_w"],
            power_cap_max_w=state["power_cap_max_w"],
            power_cap_default_w=state["power_cap_default_w"]) for i in range(n)]
        self._original_w = _limit_w(state)
        self._commanded_w: float | None = None
        self._init_window(clock)

    def _call(self, method: str, path: str, payload: dict | None = None) -> dict:
        return _power_call(self.url, method, path, payload, timeout_s=self.timeout_s)

    def read_gpus(self) -> list[GpuReading]:
        """Read every emulated GPU from ``/palsctl/power`` (see `PowerDevice.read_gpus`)."""
        state = self._call("GET", "/palsctl/power")
        return [GpuReading(index=g["index"], power_instant_w=g["power_instant_w"],
                           power_avg_w=g["power_avg_w"], energy_j=g["energy_j"],
                           power_limit_w=g["power_limit_w"], sm_clock_mhz=g["sm_clock_mhz"],
                           sw_power_cap=None) for g in state["gpus"]]

    def set_power_cap_w(self, power_cap_w: float) -> float:
        """Set the cap (clamped) after reading the limit in force (skipped when it already
        holds it; a value other than the last one set is a drift, repaired and counted);
        returns the limit read back. ``dry_run``: log and return the would-be value."""
        cap = self.clamp_cap_w(power_cap_w)
        if self.dry_run:
            if cap != self._commanded_w:
                log.info("dry run: would set the emulated power limit %.0f W -> %.0f W",
                         self.power_cap_w, cap)
            self._commanded_w = cap
            return cap
        device = _limit_w(self._call("GET", "/palsctl/power"))
        self.drift.check(None, device, self._commanded_w)
        if device != cap:
            device = _limit_w(self._call("POST", "/palsctl/power/cap", {"power_cap_w": cap}))
        self._commanded_w = cap
        return device

    @property
    def power_cap_w(self) -> float:
        """The limit the emulated GPUs hold, read from them (in a dry run, the would-be one)."""
        if self.dry_run and self._commanded_w is not None:
            return self._commanded_w
        return _limit_w(self._call("GET", "/palsctl/power"))

    def state_targets(self) -> list[dict[str, Any]]:
        """Claim entry (`palsctl.adapters.state`): the limit found at open."""
        return [{"kind": "emulator", "url": self.url, "power_limit_w": self._original_w}]

    def restore(self) -> None:
        """Write the limit found at open back (read back to confirm; retries with backoff);
        `ActuatorError` when it cannot. A dry run writes nothing."""
        if self.dry_run:
            return
        retry(lambda: restore_limit(self.url, self._original_w, timeout_s=self.timeout_s),
              attempts=self.restore_attempts, first_delay_s=self.restore_backoff_s,
              what="restoring the emulated power limit")
        self._commanded_w = None

    def close(self) -> None:
        """Restore the limit found at open (see `restore`)."""
        self.restore()


def _power_call(url: str, method: str, path: str, payload: dict | None = None, *,
                timeout_s: float = 2.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    # S310: [serving] emulator_url is checked to be http(s) by the schema (a claim holds it)
    req = urllib.request.Request(url + path, data=data, method=method,  # noqa: S310 - see above
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 - see above
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise HardwareError(f"cannot reach the emulator's power endpoint {url}{path}: "
                            f"{exc}") from None


def _limit_w(state: dict) -> float:
    return max(float(g["power_limit_w"]) for g in state["gpus"])


def restore_limit(url: str, power_limit_w: float, *, timeout_s: float = 2.0) -> None:
    """Write ``power_limit_w`` to the emulator at ``url`` unless it holds it already, and read
    it back (one try). Raises `ActuatorError`."""
    url = url.rstrip("/")
    try:
        if _limit_w(_power_call(url, "GET", "/palsctl/power", timeout_s=timeout_s)) \
                != power_limit_w:
            got = _limit_w(_power_call(url, "POST", "/palsctl/power/cap",
                                       {"power_cap_w": power_limit_w}, timeout_s=timeout_s))
            if got != power_limit_w:
                raise ActuatorError(f"the emulator at {url} holds {got:g} W after writing "
                                    f"{power_limit_w:g} W")
            log.info("emulated power limit restored to %.0f W", power_limit_w)
    except HardwareError as exc:
        raise ActuatorError(f"could not restore the emulated power limit: {exc}") from None
