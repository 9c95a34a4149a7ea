"""``palsctl gateway``: admission-control proxy in front of an OpenAI-compatible server."""
from __future__ import annotations

import argparse
import os

from palsctl.errors import ConfigError

HELP = "run the admission-control gateway (resizable concurrency limit) in front of a server"
TOKEN_ENV = "PALSCTL_GATEWAY_TOKEN"


def parse_hostport(text: str, *, key: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``:PORT`` (loopback) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ConfigError("expected HOST:PORT", key=key, value=text)
    try:
        p = int(port)
    except ValueError:
        raise ConfigError("port must be an integer", key=key, value=text) from None
    if not 0 <= p <= 65535:
        raise ConfigError("port must be in 0..65535", key=key, value=text)
    return (host.strip("[]") or "127.0.0.1"), p


def load_token(token_file: str | None) -> tuple[str, bool]:
    """The control token: from ``token_file`` (created with a new random token, mode 0600, when
    it does not exist), else the environment variable, else a new random one (printed).
    Returns (token, generated_and_not_saved)."""
    import secrets
    if token_file:
        if os.path.exists(token_file):
            token = open(token_file).read().strip()
            if len(token) < 8:
                raise ConfigError("token file holds fewer than 8 characters", key="--token-file",
                                  value=token_file)
            return token, False
        token = secrets.token_urlsafe(24)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token, False
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], False
    return secrets.token_urlsafe(24), True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--upstream", required=True, help="base URL of the server, e.g. "
                   "http://127.0.0.1:8000")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT of the proxy "
                   "(default 127.0.0.1:8080)")
    p.add_argument("--control", default=None, help="HOST:PORT of the control endpoint "
                   "(default 127.0.0.1:<listen port + 1>)")
    p.add_argument("--max-concurrency", type=int, default=64, help="initial admission limit")
    p.add_argument("--token-file", default=None, help=f"control token file (created when "
                   f"missing); default: ${TOKEN_ENV}, else a random token printed at start")
    p.add_argument("--upstream-timeout-s", type=float, default=600.0)
    p.add_argument("--duration-s", type=float, default=None,
                   help="stop after this many seconds (default: run until SIGINT/SIGTERM)")


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from palsctl.adapters.gateway import GatewayConfig, run_gateway

    host, port = parse_hostport(args.listen, key="--listen")
    if args.control:
        chost, cport = parse_hostport(args.control, key="--control")
    else:
        chost, cport = "127.0.0.1", (port + 1 if port else 0)
    token, show = load_token(args.token_file)
    cfg = GatewayConfig(upstream=args.upstream, token=token, max_concurrency=args.max_concurrency,
                        listen_host=host, listen_port=port, control_host=chost,
                        control_port=cport, upstream_timeout_s=args.upstream_timeout_s)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def ready(gw) -> None:
        print(f"gateway {gw.url} -> {cfg.upstream}; control {gw.control_url}", flush=True)
        if show:
            print(f"control token: {token}", flush=True)

    try:
        import uvloop   # a faster event loop when installed (Linux/macOS)
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(run_gateway(cfg, duration_s=args.duration_s, ready=ready))
    except OSError as exc:
        raise ConfigError(f"cannot listen: {exc}", key="--listen", value=args.listen) from None
    return 0
