"""Loopback harness: emulator + gateway + closed-loop streaming clients in a background event
loop thread, for the end-to-end tests. Everything listens on 127.0.0.1 and stops by itself."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import aiohttp

from palsctl.adapters.emulator import Emulator, EmulatorConfig
from palsctl.adapters.gateway import Gateway, GatewayConfig

TOKEN = "e2e-token-0123456789"


@dataclass
class ClientLog:
    sent: int = 0
    ok: int = 0
    bad: list = field(default_factory=list)
    token_events: list = field(default_factory=list)   # (monotonic time, tokens)
    samples: list = field(default_factory=list)        # (t, emulator active, gate in_flight, limit)


class Harness:
    def __init__(self, plant, *, clients: int, max_tokens: int, limit: int, speedup: float = 1.0,
                 max_requests_per_client: int = 200, batch_file: str | None = None,
                 use_gateway: bool = True):
        self.plant = plant
        self.clients, self.max_tokens, self.limit = clients, max_tokens, limit
        self.speedup, self.max_per_client = speedup, max_requests_per_client
        self.batch_file, self.use_gateway = batch_file, use_gateway
        self.log = ClientLog()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ thread side
    def _run(self):
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self._ready.set()

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        self._stop_clients = asyncio.Event()
        self._stop_all = asyncio.Event()
        self.emu = await Emulator(self.plant, EmulatorConfig(
            served_model_name="m", speedup=self.speedup, batch_file=self.batch_file)).start()
        self.gw = None
        if self.use_gateway:
            self.gw = await Gateway(GatewayConfig(upstream=self.emu.url, token=TOKEN,
                                                  max_concurrency=self.limit)).start()
        target = self.gw.url if self.gw else self.emu.url
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            self._ready.set()
            sampler = asyncio.create_task(self._sample())
            tasks = [asyncio.create_task(self._client(s, target, c)) for c in range(self.clients)]
            await self._stop_clients.wait()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            sampler.cancel()
        self.final_served = self.emu.served
        self.final_ids = self.emu._next_id - 1
        if self.gw:
            self.final_gate = self.gw.gate.state()
            await self.gw.stop()
        await self.emu.stop()

    async def _sample(self):
        while True:
            g = self.gw.gate if self.gw else None
            self.log.samples.append((time.monotonic(), self.emu.active,
                                     g.in_flight if g else None, g.limit if g else None))
            await asyncio.sleep(0.005)

    async def _client(self, s, url, c):
        for k in range(self.max_per_client):
            if self._stop_clients.is_set():
                return
            chat = (c + k) % 3 == 0
            body = {"model": "m", "max_tokens": self.max_tokens, "stream": True}
            if chat:
                body["messages"] = [{"role": "user", "content": f"client {c} request {k}"}]
                path = "/v1/chat/completions"
            else:
                body["prompt"] = f"client {c} request {k} " * 8
                path = "/v1/completions"
            self.log.sent += 1
            got = 0
            async with s.post(url + path, json=body) as r:
                if r.status != 200:
                    self.log.bad.append((c, k, r.status))
                    continue
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    ch = json.loads(line[6:])["choices"][0]
                    piece = ch["delta"].get("content", "") if chat else ch["text"]
                    n = piece.count(" w")
                    if n:
                        got += n
                        self.log.token_events.append((time.monotonic(), n))
            if got == self.max_tokens:
                self.log.ok += 1
            else:
                self.log.bad.append((c, k, got))

    # ------------------------------------------------------------------ test side
    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(30), "harness did not start"
        if self.error:
            raise self.error
        return self

    def stop(self):
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop_clients.set)
            self._thread.join(90)
        if self.error:
            raise self.error

    def __exit__(self, *exc):
        self.stop()

    def tokens_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in list(self.log.token_events) if t0 <= t < t1)
