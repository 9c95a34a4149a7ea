"""``palsctl gateway``: admission-control proxy in front of an OpenAI-compatible server."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

from palsctl.errors import ConfigError

__all__ = ["HELP", "add_arguments", "load_token", "main", "parse_hostport", "raise_open_file_limit"]

HELP = "run the admission-control gateway (resizable concurrency limit) in front of a server"
TOKEN_ENV = "PALSCTL_GATEWAY_TOKEN"
MIB = 1024 * 1024


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
    it does not exist; refused when others may read it), else the environment variable, else a
    new random one (printed). Returns (token, generated_and_not_saved)."""
    import secrets

    from palsctl.adapters.gateway import read_token_file

    if token_file:
        return read_token_file(token_file, create=True), False
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV], False
    return secrets.token_urlsafe(24), True


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one: every client connection is a descriptor
    (and may need a second one upstream)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX / not allowed
        pass


def _positive(value: float, key: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError("must be a finite number > 0", key=key, value=value)
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the options of ``palsctl gateway`` to its parser."""
    p.add_argument("--upstream", required=True, help="base URL of the server, e.g. "
                   "http://127.0.0.1:8000")
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT of the proxy "
                   "(default 127.0.0.1:8080)")
    p.add_argument("--control", default=None, help="HOST:PORT of the control endpoint "
                   "(default 127.0.0.1:<listen port + 1>; a non-loopback address needs "
                   "--insecure)")
    p.add_argument("--insecure", action="store_true", help="allow a control endpoint on a "
                   "non-loopback address (its bearer token then crosses the network in plain "
                   "HTTP)")
    p.add_argument("--max-concurrency", type=int, default=64, help="initial admission limit")
    p.add_argument("--token-file", default=None, help=f"control token file (created, mode "
                   f"0600, when missing; refused when others may read it); default: "
                   f"${TOKEN_ENV}, else a random token printed at start")
    p.add_argument("--upstream-timeout-s", type=float, default=600.0, metavar="S",
                   help="connect / read timeout towards the upstream server (default 600)")
    p.add_argument("--duration-s", type=float, default=None, metavar="S",
                   help="stop after this many seconds (default: run until SIGINT/SIGTERM)")
    g = p.add_argument_group("limits on clients")
    g.add_argument("--max-body-mib", type=float, default=64.0,
                   help="largest request body (MiB, default 64; 413 over it)")
    g.add_argument("--max-buffered-mib", type=float, default=128.0,
                   help="request bodies held in memory together (MiB, default 128)")
    g.add_argument("--max-connections", type=int, default=4096,
                   help="client connections (default 4096, lowered to fit the open-file limit)")
    g.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="time to send a request head after its first byte (default 10)")
    g.add_argument("--body-timeout-s", type=float, default=120.0,
                   help="time to send a whole request body (default 120; 30 between pieces)")
    g.add_argument("--keepalive-timeout-s", type=float, default=30.0,
                   help="an idle connection is closed after this long (default 30)")


def main(args: argparse.Namespace) -> int:
    """Run ``palsctl gateway`` with parsed options; return the exit status."""
    import asyncio
    import gc
    import logging

    from palsctl.adapters.gateway import GatewayConfig, run_gateway

    host, port = parse_hostport(args.listen, key="--listen")
    if args.control:
        chost, cport = parse_hostport(args.control, key="--control")
    else:
        chost, cport = "127.0.0.1", (port + 1 if port else 0)
        if cport > 65535:
            raise ConfigError("no port above the listen port for the control endpoint; "
                              "give --control", key="--listen", value=args.listen)
    if args.duration_s is not None:
        _positive(args.duration_s, "--duration-s")
    for key in ("max_body_mib", "max_buffered_mib"):
        _positive(getattr(args, key), "--" + key.replace("_", "-"))
    try:        # checked with a stand-in token first: a token file is created only for a good
        cfg = GatewayConfig(     # configuration
            upstream=args.upstream, token="checking", max_concurrency=args.max_concurrency,
            listen_host=host, listen_port=port, control_host=chost, control_port=cport,
            upstream_timeout_s=args.upstream_timeout_s,
            max_body_b=max(1, int(args.max_body_mib * MIB)),
            max_buffered_b=max(1, int(args.max_buffered_mib * MIB)),
            max_connections=args.max_connections, header_timeout_s=args.header_timeout_s,
            body_timeout_s=args.body_timeout_s,
            body_idle_timeout_s=min(30.0, args.body_timeout_s),
            keepalive_timeout_s=args.keepalive_timeout_s, insecure_control=args.insecure)
    except ConfigError as exc:      # name the command-line option, not the config field
        raise ConfigError(_option_message(exc)) from None
    token, show = load_token(args.token_file)
    cfg = dataclasses.replace(cfg, token=token)
    raise_open_file_limit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    def ready(gw) -> None:
        # what start-up allocated lives as long as the process: keep it out of the collector's
        # full passes, which would otherwise stall the event loop for 100+ ms now and then
        gc.freeze()
        print(f"gateway {gw.url} -> {cfg.upstream}; control {gw.control_url}", flush=True)
        if show:
            print(f"control token: {token}", flush=True)

    try:
        import uvloop  # a faster event loop when installed (Linux/macOS)
        runner: Callable[..., Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(run_gateway(cfg, duration_s=args.duration_s, ready=ready))
    except ConfigError as exc:      # cannot listen
        raise ConfigError(_option_message(exc)) from None
    return 0


_OPTIONS = {"upstream": "--upstream", "listen": "--listen", "control": "--control",
            "control_host": "--control", "max_concurrency": "--max-concurrency",
            "upstream_timeout_s": "--upstream-timeout-s", "max_body_b": "--max-body-mib",
            "max_buffered_b": "--max-buffered-mib", "max_connections": "--max-connections",
            "header_timeout_s": "--header-timeout-s", "body_timeout_s": "--body-timeout-s",
            "body_idle_timeout_s": "--body-timeout-s",
            "keepalive_timeout_s": "--keepalive-timeout-s"}


def _option_message(exc: ConfigError) -> str:
    msg = str(exc)
    if exc.key in _OPTIONS:
        msg = msg.replace(f"key '{exc.key}'", _OPTIONS[exc.key], 1)
    return msg
