"""Helpers for gateway tests on loopback: an upstream that digests each body, a running gateway
with small limits, and raw HTTP over asyncio streams (to misbehave as clients do)."""
from __future__ import annotations

import asyncio
import hashlib
import json
from contextlib import asynccontextmanager

from aiohttp import web

from palsctl.adapters.gateway import Gateway, GatewayConfig

TOKEN = "test-token-123456"
STEP_S = 10.0      # bound on any single wait, so a regression fails instead of hanging


class DigestUpstream:
    """Answers ``/v1/completions`` with the length and SHA-256 of the body it received (and the
    Content-Encoding it came with); ``GET /v1/models`` with one model."""

    def __init__(self) -> None:
        self.requests = 0

    async def start(self) -> "DigestUpstream":
        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = "http://127.0.0.1:%d" % site._server.sockets[0].getsockname()[1]
        return self

    async def completions(self, request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():     # raw bytes, as forwarded
            h.update(chunk)
            n += len(chunk)
        self.requests += 1
        return web.json_response({"bytes": n, "sha256": h.hexdigest(),
                                  "encoding": request.headers.get("Content-Encoding")})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m"}]})

    async def stop(self) -> None:
        await self.runner.cleanup()


@asynccontextmanager
async def running_gateway(upstream_url: str, **limits):
    """A started `Gateway` in front of ``upstream_url`` with ``limits`` (GatewayConfig fields)."""
    cfg = GatewayConfig(upstream=upstream_url, token=TOKEN, **{"max_concurrency": 4, **limits})
    gw = await Gateway(cfg).start()
    try:
        yield gw
    finally:
        await gw.stop()


def hostport(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def open_raw(url: str):
    """(reader, writer) of a new TCP connection to ``url``'s host and port."""
    return await asyncio.open_connection(*hostport(url))


def post_head(path: str = "/v1/completions", *, length: int | None = None,
              chunked: bool = False, extra: str = "") -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gw", "Content-Type: application/json"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one Content-Length response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_S)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(n), STEP_S) if n else b""
    return status, headers, body


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (bounded wait)."""
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), STEP_S):
            out += chunk
    except (ConnectionError, OSError):
        pass
    return out


async def good_request(session, url: str, prompt: str = "x") -> dict:
    """One ordinary completion request through the gateway; its JSON answer."""
    async with session.post(url + "/v1/completions", json={"prompt": prompt}) as r:
        assert r.status == 200, (r.status, await r.text())
        return await r.json()


def body_of(n: int, seed: int = 0) -> bytes:
    """``n`` bytes of a JSON-ish body (deterministic)."""
    unit = json.dumps({"prompt": f"p{seed}"}).encode()
    return (unit * (n // len(unit) + 1))[:n]
