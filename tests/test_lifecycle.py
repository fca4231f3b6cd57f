"""Shutdown as an operator sees it: stop accepting, not ready, decide everything, bounded in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import (
    Downstream,
    GatewayFactory,
    free_port,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.otlp_data import ERRORS_ONLY, make_request, send


@pytest.fixture
async def stuck_downstream() -> AsyncIterator[str]:
    """An OTLP endpoint that accepts connections and never answers."""
    never = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await never.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/traces", handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1/traces"
    never.set()
    await runner.cleanup()


async def test_shutdown_is_bounded_by_shutdown_timeout(
    start_gateway: GatewayFactory, stuck_downstream: str
) -> None:
    config = gateway_config(None, decision_wait="60s", decision_wait_after_root_received="60s")
    config["exporters"] = {"otlp_http": {"endpoint": stuck_downstream, "timeout": "30s"}}
    config["shutdown_timeout"] = "1.5s"
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    await send(url, make_request(traces=5, spans_per_trace=2))
    admin = f"http://127.0.0.1:{gateway.admin.port}"
    started = time.monotonic()
    stopping = asyncio.create_task(gateway.stop())
    async with aiohttp.ClientSession() as session:
        await wait_for(lambda: not gateway.ready, timeout=2)
        async with session.get(f"{admin}/readyz") as reply:
            assert reply.status == 503  # not ready while the exporters flush
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
            async with session.post(url, data=b"", headers={"Content-Type": "application/x-protobuf"}):
                pass
    await stopping
    assert time.monotonic() - started < 3.0
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="shutdown") == 5
    # What the backend never took is counted, not silently lost.
    assert metric(gateway, "tailgate_exporter_failed_spans_total", exporter="otlp_http") == 10


async def test_decision_cache_is_bounded(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    config = gateway_config(downstream, policies=ERRORS_ONLY)
    config["tail_sampling"]["decision_cache"] = {"sampled_cache_size": 1, "non_sampled_cache_size": 1}
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    first, second = make_request(traces=1, spans_per_trace=2), make_request(traces=1, spans_per_trace=2)
    await send(url, first)
    await send(url, second)
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 2)
    # The second decision pushed the first out of the one-entry cache: a late span of the first trace
    # starts a new trace, while one of the second still follows its decision.
    await send(url, second)
    await send(url, first)
    assert metric(gateway, "tailgate_late_spans_total", decision="dropped") == 2
    assert metric(gateway, "tailgate_buffered_traces") == 1
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 3)
