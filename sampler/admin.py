"""The admin endpoint: Prometheus `/metrics`, liveness `/healthz`, readiness `/readyz`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sampler.metrics import Metrics
from sampler.sites import start_site

# The body of GET /metrics: a Prometheus text exposition.
RenderMetrics = Callable[[], Awaitable[bytes]]

log = logging.getLogger(__name__)


class AdminServer:
    """The admin HTTP server, on its own port so that ingest traffic never reaches it."""

    def __init__(self, endpoint: str, render: RenderMetrics, is_ready: Callable[[], bool]) -> None:
        self.endpoint = endpoint
        self.render = render
        self.is_ready = is_ready
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        host, _, port = self.endpoint.rpartition(":")
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
        self.port = await start_site(runner, site)
        self._runner = runner
        log.info("admin endpoint on %s:%s", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body = await self.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")


def registry_renderer(metrics: Metrics) -> RenderMetrics:
    """/metrics of one gateway: its own registry."""

    async def render() -> bytes:
        return generate_latest(metrics.registry)

    return render
