"""The gateway under abuse, on loopback: memory under maximum-size uploads, and good requests
while thousands of slow connections are open.

Three processes: a minimal upstream (this script with ``--serve-upstream``: reads each body and
discards it, answers a small JSON), the gateway (``python -m palsctl gateway``, defaults except
the listed flags) and the load generator (this script). Everything is on 127.0.0.1; counts and
durations are bounded; the servers stop by themselves.

1. Uploads: ``--uploads`` clients each POST one body of ``--upload-mib`` MiB (default 64 × the
   64 MiB maximum) at once. The gateway's resident memory is sampled every 20 ms from
   /proc/PID/status (VmRSS) and its peak read from VmHWM; the statuses are counted.
2. Slow connections: ``--slow`` connections each send a partial request head and then one more
   header line every ``--trickle-s`` (the "slowloris" pattern), and are reopened as soon as the
   gateway closes them, while a paced client sends ``--good-rps`` ordinary requests per second
   over 4 keep-alive connections for ``--good-s`` seconds. Latency of the good requests (p50,
   p99, max) with the slow connections open, and alone before them, plus how many slow
   connections were open, how many the gateway closed, and its memory. The slow connections
   come from a fourth process, so that their cost does not land on the measuring client.
3. The same with the gateway's open-file limit lowered (``--nofile``, default 1024) and
   ``--slow-nofile`` (default 1,100) slow connections: more than it can hold.

``--gateway-src DIR`` runs the gateway from another checkout (its ``palsctl`` package first on
PYTHONPATH), for before/after comparisons.

    python bench/bench_gateway_abuse.py [--uploads 64] [--upload-mib 64] [--slow 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time

import aiohttp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import machine

MIB = 1024 * 1024
LOG = os.environ.get("BENCH_GATEWAY_LOG")      # the gateway's log goes here when set


# --------------------------------------------------------------------------- upstream process
async def upstream_main(duration_s: float) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n")[1:]:
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":", 1)[1])
                left = n
                while left:
                    left -= len(await reader.read(min(left, 1 << 20)))
                body = b'{"id": "x", "bytes": %d, "choices": [{"text": " ok"}]}' % n
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    print(f"upstream http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.sleep(duration_s)
    server.close()


# --------------------------------------------------------------------------- measurements
def cpu_s(pid: int) -> float:
    """CPU time (user + system) of a process so far, from /proc."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int, field: str = "VmRSS") -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pid: int, out: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        v = rss_mb(pid)
        if v is not None:
            out.append(v)
        await asyncio.sleep(0.02)


async def uploads(url: str, pid: int, n: int, size_b: int) -> dict:
    body = b'{"prompt": "' + b"x" * (size_b - 14) + b'"}'      # one buffer shared by all
    assert len(body) == size_b
    samples: list[float] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, stop))
    statuses: dict[int, int] = {}
    t0 = time.monotonic()
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=600)) as s:
        async def one() -> None:
            try:
                async with s.post(url + "/v1/completions", data=body,
                                  headers={"Content-Type": "application/json"}) as r:
                    text = await r.read()
                    key = r.status if r.status == 200 else f"{r.status} {text[:60]!r}"
                    statuses[key] = statuses.get(key, 0) + 1
            except aiohttp.ClientError as exc:
                key = f"{type(exc).__name__}: {str(exc)[:60]}"
                statuses[key] = statuses.get(key, 0) + 1

        await asyncio.gather(*[one() for _ in range(n)])
    wall = time.monotonic() - t0
    stop.set()
    await sampler
    return {"statuses": statuses, "wall_s": wall, "rss_max_mb": max(samples),
            "rss_p50_mb": statistics.median(samples), "hwm_mb": rss_mb(pid, "VmHWM")}


async def slowloris_main(url: str, n: int, trickle_s: float) -> None:
    """The slow connections, in their own process (so that their cost does not land on the
    measuring client): ``n`` connections that send a partial request head and then one header
    line every ``trickle_s``, reopened when the gateway closes them. Commands on stdin:
    ``go`` starts counting, ``stop`` prints the counts (JSON) and ends."""
    import json
    loop = asyncio.get_running_loop()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conns: set = set()
    st = {"closed_by_gateway": 0, "connect_failures": 0, "open_samples": []}
    stopping = False

    class Slow(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            conns.add(self)
            transport.write(b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n")

        def data_received(self, data: bytes) -> None:
            pass

        def connection_lost(self, exc) -> None:
            conns.discard(self)
            if not stopping:
                st["closed_by_gateway"] += 1
                loop.create_task(open_one())

    async def open_one() -> None:
        while not stopping:
            try:
                await asyncio.wait_for(loop.create_connection(Slow, host, int(port)), 10)
                return
            except (OSError, asyncio.TimeoutError):
                st["connect_failures"] += 1
                await asyncio.sleep(0.2)

    async def trickle() -> None:
        k = 0
        while True:
            await asyncio.sleep(trickle_s)
            line = b"X-Slow-%d: 1\r\n" % k
            k += 1
            for c in list(conns):
                c.transport.write(line)

    async def sample() -> None:
        while True:
            st["open_samples"].append(len(conns))
            await asyncio.sleep(0.1)

    for k in range(n):
        loop.create_task(open_one())
        if k % 100 == 99:
            await asyncio.sleep(0.1)
    t0 = time.monotonic()
    while len(conns) < n and time.monotonic() - t0 < 15:
        await asyncio.sleep(0.05)
    trickler = loop.create_task(trickle())
    print(json.dumps({"ready": len(conns)}), flush=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sampler = None
    while line := (await reader.readline()).strip():
        if line == b"go":
            st["closed_by_gateway"] = st["connect_failures"] = 0
            sampler = loop.create_task(sample())
        elif line == b"stop":
            break
    stopping = True
    for t in (trickler, sampler):
        if t is not None:
            t.cancel()
    print(json.dumps({k: v for k, v in st.items()}), flush=True)
    for c in list(conns):
        c.transport.abort()


class Slowloris:
    """The slow-connection process (see `slowloris_main`)."""

    def __init__(self, url: str, n: int, trickle_s: float) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--slowloris",
                                      url, "--slow", str(n), "--trickle-s", str(trickle_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = json.loads(self.proc.stdout.readline())["ready"]

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> dict:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        self.proc.wait(30)
        return out


async def good_requests(url: str, rps: float, duration_s: float) -> dict:
    lat_ms: list[float] = []
    errors: dict[str, int] = {}
    conn = aiohttp.TCPConnector(limit=4)
    async with aiohttp.ClientSession(connector=conn,
                                     timeout=aiohttp.ClientTimeout(total=30)) as s:
        async def one() -> None:
            t0 = time.perf_counter()
            try:
                async with s.post(url + "/v1/completions", json={"prompt": "x"}) as r:
                    await r.read()
                    if r.status == 200:
                        lat_ms.append((time.perf_counter() - t0) * 1e3)
                    else:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        tasks = []
        t_start = time.monotonic()
        for k in range(int(rps * duration_s)):
            await asyncio.sleep(max(0.0, t_start + k / rps - time.monotonic()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    a = np.asarray(lat_ms) if lat_ms else np.asarray([float("nan")])
    return {"sent": int(rps * duration_s), "ok": len(lat_ms), "errors": errors,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max())}


def slow_phase(url: str, pid: int, n_slow: int, args) -> dict:
    c0 = cpu_s(pid)
    alone = run(good_requests(url, args.good_rps, args.good_s))
    cpu_alone = cpu_s(pid) - c0
    slow = Slowloris(url, n_slow, args.trickle_s)
    samples: list[float] = []

    async def measured() -> dict:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(pid, samples, stop))
        slow.go()
        try:
            return await good_requests(url, args.good_rps, args.good_s)
        finally:
            stop.set()
            await sampler

    c0 = cpu_s(pid)
    loaded = run(measured())
    cpu_loaded = cpu_s(pid) - c0
    st = slow.stop()
    opened = st["open_samples"]
    return {"alone": alone, "loaded": loaded, "slow_open_at_start": slow.ready,
            "slow_open_min": min(opened), "slow_open_median": statistics.median(opened),
            "closed_by_gateway": st["closed_by_gateway"],
            "connect_failures": st["connect_failures"], "rss_max_mb": max(samples),
            "cpu_alone_s": cpu_alone, "cpu_loaded_s": cpu_loaded}


# --------------------------------------------------------------------------- processes
def start_upstream(budget_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-upstream",
                             "--budget-s", str(budget_s)], stdout=subprocess.PIPE, text=True)
    m = re.search(r"upstream (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise SystemExit("the upstream did not start")
    return proc, m.group(1)


def start_gateway(upstream: str, budget_s: float, *, src: str | None,
                  nofile: int | None = None, extra: list[str] = ()) -> tuple[subprocess.Popen,
                                                                              str]:
    env = dict(os.environ, PALSCTL_GATEWAY_TOKEN="bench-token-0123456789")
    if src:
        src = os.path.abspath(src)
        env["PYTHONPATH"] = src

    def limit() -> None:
        if nofile:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen([sys.executable, "-m", "palsctl", "gateway", "--upstream", upstream,
                             "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0",
                             "--max-concurrency", "64", "--duration-s", str(budget_s), *extra],
                            stdout=subprocess.PIPE, text=True, env=env, preexec_fn=limit,
                            cwd=src,       # `-m` puts the working directory first on sys.path
                            stderr=open(LOG, "a") if LOG else subprocess.DEVNULL)
    m = re.search(r"gateway (http://\S+)", proc.stdout.readline())
    if not m:
        proc.kill()
        raise SystemExit("the gateway did not start")
    return proc, m.group(1)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def show_good(tag: str, g: dict) -> None:
    print(f"  {tag}: {g['ok']}/{g['sent']} ok, p50 {g['p50_ms']:.1f} ms, p99 {g['p99_ms']:.1f} "
          f"ms, max {g['max_ms']:.1f} ms, errors {g['errors'] or 'none'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--slowloris", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--budget-s", type=float, default=900.0, help=argparse.SUPPRESS)
    ap.add_argument("--uploads", type=int, default=64)
    ap.add_argument("--upload-mib", type=float, default=64.0)
    ap.add_argument("--slow", type=int, default=2000)
    ap.add_argument("--slow-nofile", type=int, default=1100)
    ap.add_argument("--nofile", type=int, default=1024)
    ap.add_argument("--trickle-s", type=float, default=1.0)
    ap.add_argument("--good-rps", type=float, default=100.0)
    ap.add_argument("--good-s", type=float, default=10.0)
    ap.add_argument("--skip", default="", help="comma list of phases to skip: "
                    "uploads,slow,nofile")
    ap.add_argument("--gateway-src", default=None, help="run the gateway from this checkout")
    ap.add_argument("--gateway-args", default="", help="extra gateway flags (one string)")
    args = ap.parse_args()
    if args.serve_upstream:
        run(upstream_main(args.budget_s))
        return
    if args.slowloris:
        run(slowloris_main(args.slowloris, args.slow, args.trickle_s))
        return
    skip = set(filter(None, args.skip.split(",")))
    print(machine() + f", load average {os.getloadavg()[0]:.1f} at start")
    print(f"gateway from {args.gateway_src or 'this checkout'}; extra flags: "
          f"{args.gateway_args or 'none'}")
    up, up_url = start_upstream(args.budget_s)
    extra = args.gateway_args.split()
    try:
        if "uploads" not in skip:
            gw, url = start_gateway(up_url, args.budget_s, src=args.gateway_src, extra=extra)
            try:
                base = rss_mb(gw.pid)
                r = run(uploads(url, gw.pid, args.uploads, int(args.upload_mib * MIB)))
                print(f"\n{args.uploads} concurrent uploads of {args.upload_mib:g} MiB: "
                      f"statuses {r['statuses']}, {r['wall_s']:.1f} s")
                print(f"  gateway RSS: idle {base:.0f} MB, median {r['rss_p50_mb']:.0f} MB, "
                      f"max sampled {r['rss_max_mb']:.0f} MB, peak (VmHWM) {r['hwm_mb']:.0f} MB")
            finally:
                stop(gw)
        for phase, n_slow, nofile in (("slow", args.slow, None),
                                      ("nofile", args.slow_nofile, args.nofile)):
            if phase in skip:
                continue
            gw, url = start_gateway(up_url, args.budget_s, src=args.gateway_src, nofile=nofile,
                                    extra=extra)
            try:
                r = slow_phase(url, gw.pid, n_slow, args)
                print(f"\n{n_slow} slow connections (a header line every {args.trickle_s:g} s)"
                      + (f", gateway open-file limit {nofile}" if nofile else "")
                      + f"; good requests at {args.good_rps:g}/s for {args.good_s:g} s:")
                show_good("alone     ", r["alone"])
                show_good("with slow ", r["loaded"])
                print(f"  slow connections open: {r['slow_open_at_start']} when the good "
                      f"requests started, median {r['slow_open_median']:.0f}, min "
                      f"{r['slow_open_min']}; closed by the gateway {r['closed_by_gateway']}, "
                      f"connect failures {r['connect_failures']}; gateway RSS max "
                      f"{r['rss_max_mb']:.0f} MB; gateway CPU {r['cpu_alone_s']:.2f} s alone, "
                      f"{r['cpu_loaded_s']:.2f} s with the slow connections")
            finally:
                stop(gw)
    finally:
        stop(up)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
