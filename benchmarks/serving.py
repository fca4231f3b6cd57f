"""The server lifecycle the benchmark's own servers share: serve an aiohttp app until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web


async def handle_ready(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve_app(app: web.Application, host: str, port: int) -> None:
    """Serve `app` with a `/readyz` route on host:port until a stop signal."""
    app.router.add_get("/readyz", handle_ready)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()
