"""Benchmark of the admission gateway on loopback (``palsctl gateway``).

Three processes: a trivial upstream (this script with ``--serve-upstream``), the gateway
(``python -m palsctl gateway``), and the load generator (this script). Everything listens on
127.0.0.1; request counts and durations are bounded; the servers stop by themselves.

1. Added latency at 64 concurrent streams: the upstream streams SSE chunks every 20 ms, each
   carrying its send time (``time.monotonic_ns``, one clock for all processes on Linux); the
   client records receive time − send time per chunk, and the time to first byte, once direct
   to the upstream and once through the gateway. Added latency = gateway − direct (p50, p99),
   over all chunks and over the chunks after each stream's first (the per-token path of a
   running stream; a first chunk also queues behind the other streams' request set-up).
   Two patterns: streams started at random offsets (chunks spread over time) and streams
   started together (every stream emits at once, like a vLLM decode step).
2. Non-streaming throughput: 64 concurrent clients send small completion requests for a fixed
   time; requests/s direct and through the gateway.

Each measurement is repeated ``--repeat`` times (direct and gateway interleaved); medians are
printed.

CPU placement (``--pin``, the default on Linux with 2 or more CPUs): the upstream and the load
generator are confined to the last CPU (``os.sched_setaffinity``), so the gateway, free to run on
any CPU, finds one that they do not use, as it would in front of a GPU server whose clients run
elsewhere; the direct path is measured under the same placement. The gateway itself is not
confined to one CPU: on a virtual machine a single vCPU can stall for seconds, and a process
pinned to it cannot move away (seen here as 30-s gaps). ``--no-pin`` leaves the three processes
to the scheduler.

    python bench/bench_gateway.py [--repeat 3] [--streams 64] [--duration-s 4] [--no-pin]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import aiohttp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK_INTERVAL_S = 0.02
CHUNKS = 40


# --------------------------------------------------------------------------- upstream process
async def upstream_main(duration_s: float) -> None:
    from aiohttp import web

    async def completions(request):
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"id": "x", "object": "text_completion",
                                      "choices": [{"index": 0, "text": " ok",
                                                   "finish_reason": "length"}],
                                      "usage": {"completion_tokens": 1}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for k in range(int(body.get("max_tokens", CHUNKS))):
            await resp.write(b'data: {"t":%d,"k":%d}\n\n' % (time.monotonic_ns(), k))
            await asyncio.sleep(CHUNK_INTERVAL_S)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"upstream http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.sleep(duration_s)
    await runner.cleanup()


# --------------------------------------------------------------------------- load generator
async def stream_latencies(url: str, streams: int, rounds: int, *, synchronized: bool,
                           seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    """Per-chunk delivery latency, the same for every chunk after a stream's first (the
    per-token path once a stream runs; the first chunk also waits behind the other requests
    being set up) and time to first byte (ms). A first, unmeasured round opens
    the connections. ``synchronized``: every stream starts at the same instant, so all streams
    emit their chunks together (like one vLLM decode step producing a token for every running
    sequence); otherwise each stream starts at a random offset within the chunk interval."""
    chunk_lat, later_lat, ttfb = [], [], []
    rng = np.random.default_rng(seed)
    offsets = np.zeros(streams) if synchronized else rng.uniform(0, CHUNK_INTERVAL_S, streams)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=120)) as s:
        async def warm():
            async with s.post(url + "/v1/completions", json={"prompt": "x"}) as r:
                await r.read()

        await asyncio.gather(*[warm() for _ in range(streams)])
        start_at = time.monotonic() + 0.05

        async def one(offset):
            await asyncio.sleep(max(0.0, start_at + offset - time.monotonic()))
            for _ in range(rounds):
                t0 = time.monotonic_ns()
                first = True
                async with s.post(url + "/v1/completions",
                                  json={"prompt": "x", "stream": True, "max_tokens": CHUNKS}) as r:
                    async for line in r.content:
                        now = time.monotonic_ns()
                        if not line.startswith(b"data: {"):
                            continue
                        msg = json.loads(line[6:])
                        if first:
                            ttfb.append((now - t0) / 1e6)
                            first = False
                        chunk_lat.append((now - msg["t"]) / 1e6)
                        if msg["k"] > 0:
                            later_lat.append(chunk_lat[-1])

        await asyncio.gather(*[one(o) for o in offsets])
    return chunk_lat, later_lat, ttfb


async def throughput(url: str, clients: int, duration_s: float) -> float:
    done = 0
    deadline = time.monotonic() + duration_s
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def one():
            nonlocal done
            while time.monotonic() < deadline:
                async with s.post(url + "/v1/completions", json={"prompt": "x"}) as r:
                    await r.read()
                    if r.status == 200:
                        done += 1

        t0 = time.monotonic()
        await asyncio.gather(*[one() for _ in range(clients)])
        return done / (time.monotonic() - t0)


def run(coro):
    """Uvloop when installed (cheaper load generator and upstream), else asyncio."""
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def pin_cpus() -> tuple[set[int], int] | None:
    """(gateway CPUs, upstream + load generator CPU), or None where affinity cannot be set."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (set(cpus), cpus[-1]) if len(cpus) >= 2 else None


def start(cmd: list[str], pattern: str) -> tuple[subprocess.Popen, re.Match]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    m = re.search(pattern, line)
    if not m:
        proc.kill()
        raise SystemExit(f"could not start {cmd[:4]}: {line!r}")
    return proc, m


def proc_cpu_s(pid: int) -> float | None:
    """CPU time (user + system) of a process, from /proc (None elsewhere)."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def wakeup_rtt_us(cpu_a: int, cpu_b: int, n: int = 1000,
                  gap_s: float = 0.001) -> tuple[float, float]:
    """Round trip of one byte between two processes on ``cpu_a`` and ``cpu_b`` over a Unix
    socket pair, with ``gap_s`` idle between trips (so an idle CPU must be woken): (p50, p99)
    in microseconds. Context for the latency figures: every chunk through the gateway crosses
    between processes twice more than a direct one."""
    import socket
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:                          # the echo process
        try:
            os.sched_setaffinity(0, {cpu_b})
            while (d := b.recv(64)) and d != b"q":
                b.send(d)
        finally:
            os._exit(0)
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu_a})
    rtts = []
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            a.send(b"x")
            a.recv(64)
            rtts.append((time.perf_counter_ns() - t0) / 1e3)
            time.sleep(gap_s)
    finally:
        a.send(b"q")
        os.waitpid(pid, 0)
        os.sched_setaffinity(0, mask)
        a.close()
        b.close()
    return float(np.percentile(rtts, 50)), float(np.percentile(rtts, 99))


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"nproc {os.cpu_count()}, {model}, Python {platform.python_version()}, "
            f"load average {load:.1f} at start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="requests per stream client per run")
    ap.add_argument("--clients", type=int, default=64, help="non-streaming clients")
    ap.add_argument("--duration-s", type=float, default=4.0, help="throughput run length")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="upstream + load generator on one CPU, the gateway free (default on)")
    args = ap.parse_args()
    budget_s = 60 + args.repeat * (args.rounds * CHUNKS * CHUNK_INTERVAL_S * 6
                                   + args.duration_s * 2 + 30)
    if args.serve_upstream:
        run(upstream_main(budget_s))
        return

    print(machine())
    if pin_cpus() is not None and hasattr(os, "fork"):
        c0, c1 = sorted(os.sched_getaffinity(0))[:2]
        same, cross = wakeup_rtt_us(c1, c1), wakeup_rtt_us(c0, c1)
        print(f"process wake-up round trip, 1 ms apart (p50/p99 us): same CPU "
              f"{same[0]:.0f}/{same[1]:.0f}, across CPUs {cross[0]:.0f}/{cross[1]:.0f}")
    pins = pin_cpus() if args.pin else None
    if pins is not None:
        os.sched_setaffinity(0, {pins[1]})     # the upstream inherits it
        print(f"pinned: upstream + load generator on CPU {pins[1]}, gateway on any of "
              f"{sorted(pins[0])}")
    else:
        print("not pinned: gateway, upstream and load generator share all CPUs")
    try:
        import uvloop
        print(f"event loop: uvloop {uvloop.__version__} (gateway, upstream, load generator)")
    except ImportError:
        print("event loop: asyncio (uvloop not installed)")
    up, m = start([sys.executable, os.path.abspath(__file__), "--serve-upstream"],
                  r"upstream (http://\S+)")
    up_url = m.group(1)
    env_token = dict(os.environ, PALSCTL_GATEWAY_TOKEN="bench-token-0123456789")
    gw = subprocess.Popen([sys.executable, "-m", "palsctl", "gateway", "--upstream", up_url,
                           "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
                           "--max-concurrency", "4096", "--duration-s", str(budget_s)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env_token,
                          preexec_fn=(lambda: os.sched_setaffinity(0, pins[0])) if pins else None)
    m = re.search(r"gateway (http://\S+)", gw.stdout.readline())
    if not m:
        raise SystemExit("gateway did not start")
    gw_url = m.group(1)
    try:
        rows: dict[str, list[float]] = {}
        for r in range(args.repeat):
            rows.setdefault("load", []).append(os.getloadavg()[0])
            for mode in ("staggered", "synchronized"):
                for name, url in (("direct", up_url), ("gateway", gw_url)):
                    c0 = proc_cpu_s(gw.pid)
                    lat, later, ttfb = run(stream_latencies(url, args.streams, args.rounds,
                                                     synchronized=mode == "synchronized",
                                                     seed=r))
                    c1 = proc_cpu_s(gw.pid)
                    if name == "gateway" and c0 is not None and c1 is not None:
                        # includes the warm-up requests and each stream's request overhead
                        rows.setdefault("gateway CPU per chunk us", []).append(
                            1e6 * (c1 - c0) / len(lat))
                    for q in (50, 99):
                        rows.setdefault(f"{mode} {name} chunk p{q}", []).append(
                            float(np.percentile(lat, q)))
                        rows.setdefault(f"{mode} {name} ttfb p{q}", []).append(
                            float(np.percentile(ttfb, q)))
                        rows.setdefault(f"{mode} {name} later p{q}", []).append(
                            float(np.percentile(later, q)))
                    rows.setdefault("samples", []).append(len(lat))
            for name, url in (("direct", up_url), ("gateway", gw_url)):
                c0 = proc_cpu_s(gw.pid)
                rps = run(throughput(url, args.clients, args.duration_s))
                c1 = proc_cpu_s(gw.pid)
                rows.setdefault(f"{name} req/s", []).append(rps)
                if name == "gateway" and c0 is not None and c1 is not None:
                    rows.setdefault("gateway CPU per request us", []).append(
                        1e6 * (c1 - c0) / (rps * args.duration_s))
            print(f"run {r + 1}/{args.repeat} done", flush=True)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"\n{args.streams} concurrent streams, {CHUNKS} chunks each every "
              f"{CHUNK_INTERVAL_S * 1e3:.0f} ms, {args.rounds} rounds; medians of "
              f"{args.repeat} runs (ms); {int(med['samples'])} chunks per run")
        for mode in ("staggered", "synchronized"):
            print(f" {mode} streams:")
            for k in ("chunk p50", "chunk p99", "later p50", "later p99", "ttfb p50",
                      "ttfb p99"):
                dk, gk = f"{mode} direct {k}", f"{mode} gateway {k}"
                d, g = med[dk], med[gk]
                runs = ", ".join(f"{gv - dv:.3f}" for dv, gv in zip(rows[dk], rows[gk]))
                print(f"  {k:10s} direct {d:7.3f}  gateway {g:7.3f}  added {g - d:7.3f} "
                      f"(per run: {runs})")
        print(f"\nnon-streaming, {args.clients} clients, {args.duration_s:g} s runs: "
              f"direct {med['direct req/s']:.0f} req/s, gateway {med['gateway req/s']:.0f} req/s "
              f"(gateway runs: {', '.join(f'{x:.0f}' for x in rows['gateway req/s'])})")
        if "gateway CPU per request us" in med:
            cpu_req = med["gateway CPU per request us"]
            print(f"gateway process CPU: {cpu_req:.0f} us per non-streaming request "
                  f"(= {1e6 / cpu_req:.0f} req/s per fully available core), "
                  f"{med['gateway CPU per chunk us']:.0f} us per streamed chunk")
        print(f"load average at the start of each run: "
              f"{', '.join(f'{x:.1f}' for x in rows['load'])}; at the end: "
              f"{os.getloadavg()[0]:.1f}")
    finally:
        for p in (gw, up):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
