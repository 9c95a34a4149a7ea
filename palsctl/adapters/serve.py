"""Running an asyncio server (the gateway, the emulator) until it is told to stop."""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["serve_until_stopped"]


class _Server(Protocol):
    async def start(self) -> object: ...

    async def stop(self) -> None: ...


async def serve_until_stopped(server: _Server, *, duration_s: float | None = None,
                              ready: Callable[[Any], None] | None = None) -> None:
    """Start ``server``, call ``ready(server)``, and serve until SIGINT/SIGTERM, cancellation or
    ``duration_s`` wall seconds; ``server.stop()`` runs in every case."""
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not the main thread
            pass
    try:
        if ready is not None:
            ready(server)
        try:
            await asyncio.wait_for(stop.wait(), timeout=duration_s)
        except asyncio.TimeoutError:
            pass
    finally:
        await server.stop()
