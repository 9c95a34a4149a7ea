"""The gateway's upstream client (`palsctl.adapters.upstream`) through a running gateway, against
raw asyncio upstreams that script the HTTP edge cases byte for byte (no sleeps: each step waits
for an event)."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from palsctl.adapters.gateway import Gateway, GatewayConfig

pytestmark = pytest.mark.timeout(60)
TOKEN = "test-token-123456"
STEP_S = 10.0      # bound on any single wait, so a regression fails instead of hanging


class RawUpstream:
    """A TCP server that reads each request (head + Content-Length body) and lets ``script``
    answer it on the raw stream: ``await script(n, request_line, body, reader, writer)``;
    returning False closes the connection."""

    def __init__(self, script):
        self.script = script
        self.request_lines: list[str] = []
        self.connections = 0

    async def start(self, prefix: str = "") -> "RawUpstream":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d%s" % (self.server.sockets[0].getsockname()[1], prefix)
        return self

    async def _serve(self, reader, writer):
        self.connections += 1
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = 0
                for line in lines[1:]:
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                self.request_lines.append(lines[0])
                keep = await self.script(n, lines[0], body, reader, writer)
                n += 1
                if keep is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self):
        self.server.close()
        await self.server.wait_closed()


def json_response(payload: dict, *, close: bool = False) -> bytes:
    body = json.dumps(payload).encode()
    conn = b"Connection: close\r\n" if close else b""
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n"
            % (conn, len(body)) + body)


SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def sse_chunk(text: str) -> bytes:
    data = f"data: {text}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


async def with_gateway(up: RawUpstream, fn, *, prefix: str = "", timeout_s: float = 600.0):
    await up.start(prefix)
    gw = await Gateway(GatewayConfig(upstream=up.url, token=TOKEN, max_concurrency=4,
                                     upstream_timeout_s=timeout_s)).start()
    try:
        async with aiohttp.ClientSession() as s:
            await asyncio.wait_for(fn(gw, s), 4 * STEP_S)
    finally:
        await gw.stop()
        await up.stop()


def test_stream_chunks_are_forwarded_as_they_arrive():
    """The upstream sends its second chunk only after the client has received the first."""
    async def main():
        first_seen = asyncio.Event()

        async def script(n, line, body, reader, writer):
            writer.write(SSE_HEAD + sse_chunk("one"))
            await writer.drain()
            await asyncio.wait_for(first_seen.wait(), STEP_S)
            writer.write(sse_chunk("two") + sse_chunk("[DONE]") + b"0\r\n\r\n")
            await writer.drain()

        async def fn(gw, s):
            body = {"prompt": "x", "stream": True}
            async with s.post(gw.url + "/v1/completions", json=body) as r:
                assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                assert await asyncio.wait_for(r.content.readline(), STEP_S) == b"data: one\n"
                first_seen.set()
                rest = [line async for line in r.content if line.strip()]
            assert rest == [b"data: two\n", b"data: [DONE]\n"]
            assert gw.gate.completed_total == 1 and gw.gate.in_flight == 0

        await with_gateway(RawUpstream(script), fn)

    asyncio.run(main())


def test_keep_alive_reuse_and_one_safe_retry_when_the_upstream_dropped_it():
    """Sequential requests share one upstream connection; a kept-alive connection that the
    upstream closes without answering is retried once on a fresh one (no 502, no duplicate)."""

    async def main():
        async def script(n, line, body, reader, writer):
            if n == 3:            # the 4th request on this connection: drop it unanswered
                return False
            writer.write(json_response({"n": n, "body": body.decode()}))
            await writer.drain()

        up = RawUpstream(script)

        async def fn(gw, s):
            answers = []
            for i in range(5):
                async with s.post(gw.url + "/v1/chat/completions", json={"i": i}) as r:
                    assert r.status == 200
                    answers.append(await r.json())
            assert [json.loads(a["body"])["i"] for a in answers] == [0, 1, 2, 3, 4]
            # requests 0-2 on the first connection, 3 retried and 4 on the second
            assert [a["n"] for a in answers] == [0, 1, 2, 0, 1]
            assert up.connections == 2 and len(up.request_lines) == 6
            assert gw.gate.completed_total == 5

        await with_gateway(up, fn)

    asyncio.run(main())


def test_client_leaving_mid_stream_aborts_the_upstream_and_frees_the_slot():
    async def main():
        upstream_saw_close = asyncio.Event()

        async def script(n, line, body, reader, writer):
            writer.write(SSE_HEAD + sse_chunk("one"))
            await writer.drain()
            assert await reader.read() == b""        # the gateway closed its side
            upstream_saw_close.set()
            return False

        async def fn(gw, s):
            r = await s.post(gw.url + "/v1/completions", json={"prompt": "x", "stream": True})
            assert await asyncio.wait_for(r.content.readline(), STEP_S) == b"data: one\n"
            r.close()                                 # the client goes away mid-stream
            await asyncio.wait_for(upstream_saw_close.wait(), STEP_S)
            while gw.gate.in_flight:
                await asyncio.sleep(0)
            assert gw.gate.admitted_total == 1

        await with_gateway(RawUpstream(script), fn)

    asyncio.run(main())


def test_read_timeout_gives_502_before_the_body_and_aborts_a_stream_after():
    """A silent upstream is failed by the watchdog (driven here with a future loop time)."""

    async def main():
        stalled = asyncio.Queue()

        async def script(n, line, body, reader, writer):
            if b"stream" in body:
                writer.write(SSE_HEAD + sse_chunk("one"))
            else:                                     # promises 100 bytes, sends none
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100\r\n\r\n")
            await writer.drain()
            await stalled.put(n)
            await reader.read()
            return False

        async def fn(gw, s):
            loop = asyncio.get_running_loop()
            task = asyncio.create_task(s.post(gw.url + "/v1/completions", json={"p": "x"}))
            await asyncio.wait_for(stalled.get(), STEP_S)
            gw._pool.sweep(loop.time() + 1.0)          # within the timeout: nothing happens
            for _ in range(20):
                await asyncio.sleep(0)
            assert not task.done()
            gw._pool.sweep(loop.time() + 31.0)
            r = await asyncio.wait_for(task, STEP_S)
            assert r.status == 502 and "upstream" in (await r.json())["error"]["message"]

            async with s.post(gw.url + "/v1/completions", json={"stream": True}) as r:
                assert await asyncio.wait_for(r.content.readline(), STEP_S) == b"data: one\n"
                await asyncio.wait_for(stalled.get(), STEP_S)
                gw._pool.sweep(loop.time() + 31.0)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.content.read(), STEP_S)
            while gw.gate.in_flight:
                await asyncio.sleep(0)
            assert gw._counters["upstream_errors"] == 1

        await with_gateway(RawUpstream(script), fn, timeout_s=30.0)

    asyncio.run(main())


def test_prefix_query_close_delimited_body_head_and_hop_headers():
    async def main():
        async def script(n, line, body, reader, writer):
            if line.startswith("HEAD"):
                # a HEAD answer announces a length but carries no body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 42\r\n\r\n")
            else:                # no length, no chunking: the body ends when the socket closes
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"X-Up: 1\r\nConnection: close\r\n\r\n"
                             + json.dumps({"line": line}).encode())
            await writer.drain()
            return False

        up = RawUpstream(script)

        async def fn(gw, s):
            async with s.get(gw.url + "/v1/models?limit=2&x=a%20b",
                             headers={"Connection": "keep-alive", "X-Req": "r"}) as r:
                assert r.status == 200 and r.headers["X-Up"] == "1"
                assert (await r.json())["line"] == "GET /base/v1/models?limit=2&x=a%20b HTTP/1.1"
            async with s.head(gw.url + "/v1/models") as r:
                assert r.status == 200
            async with s.post(gw.url + "/v1/embeddings", json={}) as r:
                assert r.status == 405
            async with s.get(gw.url + "/nope") as r:
                assert r.status == 404
            async with s.get(gw.url + "/metrics") as r:
                assert "palsctl_gateway_in_flight" in await r.text()
            assert up.request_lines == ["GET /base/v1/models?limit=2&x=a%20b HTTP/1.1",
                                        "HEAD /base/v1/models HTTP/1.1"]

        await with_gateway(up, fn, prefix="/base")

    asyncio.run(main())


def test_request_headers_forwarded_without_hop_by_hop_ones():
    async def main():
        heads = []

        async def script(n, line, body, reader, writer):   # one request per connection
            writer.write(json_response({"ok": True}, close=True))
            await writer.drain()
            return False

        up = RawUpstream(script)
        orig = up._serve

        async def spy(reader, writer):          # record the raw head the gateway sends
            peek = await reader.readuntil(b"\r\n\r\n")
            heads.append(peek.decode())
            feed = asyncio.StreamReader()
            feed.feed_data(peek)

            async def pump():
                while data := await reader.read(65536):
                    feed.feed_data(data)
                feed.feed_eof()
            task = asyncio.create_task(pump())
            await orig(feed, writer)
            task.cancel()

        up._serve = spy

        async def fn(gw, s):
            async with s.post(gw.url + "/v1/completions", data=b'{"a": 1}',
                              headers={"Content-Type": "application/json",
                                       "Authorization": "Bearer user-key",
                                       "Proxy-Authorization": "secret", "TE": "trailers",
                                       "Keep-Alive": "timeout=5"}) as r:
                assert r.status == 200
            # a client that waits for "100 Continue" before sending its body gets it
            async with s.post(gw.url + "/v1/completions", data=b'{"b": 2}', expect100=True,
                              headers={"Content-Type": "application/json"}) as r:
                assert r.status == 200
            async with s.post(gw.url + "/v1/completions", data=b"{}",
                              headers={"Expect": "something-else"}) as r:
                assert r.status == 417
            assert len(heads) == 2 and "expect" not in heads[1].lower()
            head = heads[0].lower()
            assert "authorization: bearer user-key" in head
            assert "content-type: application/json" in head and "content-length: 8" in head
            assert "proxy-authorization" not in head and "\r\nte:" not in head
            assert "keep-alive" not in head
            assert head.count("\r\nhost: 127.0.0.1:") == 1

        await with_gateway(up, fn)

    asyncio.run(main())


def test_large_stream_arrives_whole_and_in_order():
    n_events = 20000                       # ~0.6 MB of SSE, written as fast as the socket takes

    async def main():
        async def script(n, line, body, reader, writer):
            writer.write(SSE_HEAD)
            for i in range(0, n_events, 500):
                writer.write(b"".join(sse_chunk(f"{j:06d}") for j in range(i, i + 500)))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()

        async def fn(gw, s):
            async with s.post(gw.url + "/v1/completions", json={"stream": True}) as r:
                data = await r.content.read()
            assert data == b"".join(f"data: {j:06d}\n\n".encode() for j in range(n_events))

        await with_gateway(RawUpstream(script), fn)

    asyncio.run(main())


def test_connection_pauses_the_upstream_when_the_reader_falls_behind():
    from palsctl.adapters.upstream import READ_HIGH_WATER_B, _Connection

    class FakeTransport:
        def __init__(self):
            self.calls = []

        def pause_reading(self):
            self.calls.append("pause")

        def resume_reading(self):
            self.calls.append("resume")

        def get_extra_info(self, name):
            return None

    class FakePool:
        loop = None

    async def main():
        FakePool.loop = asyncio.get_running_loop()
        conn = _Connection(FakePool())
        t = FakeTransport()
        conn.connection_made(t)
        conn.busy = True
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
        piece = b"x" * 65536
        total = READ_HIGH_WATER_B + 2 * len(piece)
        conn.data_received(head % total)
        assert conn.headers_done and conn.status == 200
        sent = 0
        while sent < READ_HIGH_WATER_B:
            conn.data_received(piece)
            sent += len(piece)
        assert t.calls == []                  # at the mark, not over it
        conn.data_received(piece)
        sent += len(piece)
        assert t.calls == ["pause"]
        assert len(conn.take()) == sent and t.calls == ["pause", "resume"]
        conn.data_received(piece)
        assert conn.complete and conn.take() == piece and t.calls == ["pause", "resume"]

    asyncio.run(main())


def test_connection_idle_too_long_is_closed_not_reused():
    """Servers drop idle keep-alive connections (uvicorn after 5 s); one idle past the pool's
    idle timeout is replaced (the idle time is simulated by backdating its last activity)."""

    async def main():
        closed_by_gateway = asyncio.Event()

        async def script(n, line, body, reader, writer):
            writer.write(json_response({"n": n}))
            await writer.drain()

        up = RawUpstream(script)
        orig = up._serve

        async def watch(reader, writer):
            await orig(reader, writer)
            closed_by_gateway.set()

        up._serve = watch

        async def fn(gw, s):
            for _ in range(2):
                async with s.post(gw.url + "/v1/completions", json={}) as r:
                    assert r.status == 200
            assert up.connections == 1 and len(gw._pool._idle) == 1
            gw._pool._idle[0].last_io_s -= gw._pool.idle_timeout_s + 0.1
            async with s.post(gw.url + "/v1/completions", json={}) as r:
                assert (await r.json())["n"] == 0            # first request on a new connection
            assert up.connections == 2
            await asyncio.wait_for(closed_by_gateway.wait(), STEP_S)

        await with_gateway(up, fn)

    asyncio.run(main())
