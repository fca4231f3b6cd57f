"""Shutdown as an operator sees it: stop accepting, not ready, decide everything, bounded in time."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

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


async def test_shutdown_flushes_more_than_an_exporter_queue_holds(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, decision_wait="60s", decision_wait_after_root_received="60s")
    config["exporters"]["otlp_http"]["batch"] = {"timeout": "0.02s", "queue_size": 100, "send_batch_size": 20}
    gateway = await start_gateway(config)
    for _ in range(5):
        await send(receiver_url(gateway), make_request(traces=10, spans_per_trace=4))
    await gateway.stop()  # 200 buffered spans, a queue of 100: decided as the queue makes room
    assert len(downstream.spans()) == 200
    assert metric(gateway, "tailgate_exporter_dropped_spans_total", exporter="otlp_http") == 0


async def test_a_stuck_exporter_does_not_starve_the_others_at_shutdown(
    start_gateway: GatewayFactory, stuck_downstream: str, tmp_path: Path
) -> None:
    config = gateway_config(None, decision_wait="60s", decision_wait_after_root_received="60s")
    sink = tmp_path / "traces.jsonl"
    config["exporters"] = {
        "otlp_http": {"endpoint": stuck_downstream, "timeout": "30s"},
        # Longer than the shutdown budget: only shutdown's own flush sends this batch.
        "file": {"path": str(sink), "batch": {"timeout": "5s"}},
    }
    config["shutdown_timeout"] = "1.5s"
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=5, spans_per_trace=2))
    await gateway.stop()
    written = [
        span
        for line in sink.read_text().splitlines()
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
        for span in scope_spans["spans"]
    ]
    assert len(written) == 10
    assert metric(gateway, "tailgate_exporter_failed_spans_total", exporter="otlp_http") == 10


async def test_a_full_stuck_exporter_leaves_the_others_time_to_flush_at_shutdown(
    start_gateway: GatewayFactory, downstream: Downstream, stuck_downstream: str
) -> None:
    """One exporter's downstream never answers and its queue is full; another's is healthy. Deciding what
    is buffered waits for room in every queue, but not into the time the healthy one needs to send it:
    it waited out the whole shutdown_timeout, and the healthy exporter failed the last traces with 0 s
    left to flush them."""
    config = gateway_config(downstream, decision_wait="60s", decision_wait_after_root_received="60s")
    config["tail_sampling"]["num_traces"] = 5  # beyond it the oldest traces are decided at once
    config["exporters"]["otlp_http/stuck"] = {
        "endpoint": stuck_downstream,
        "timeout": "30s",
        "batch": {"timeout": "0.02s", "queue_size": 10, "send_batch_size": 10},
    }
    config["shutdown_timeout"] = "1.5s"
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=15, spans_per_trace=2))
    # 10 traces decided early: the healthy exporter delivers their 20 spans, the stuck one queues 10
    # spans (full) and refuses the rest.
    await wait_for(lambda: len(downstream.spans()) == 20)
    assert gateway.exporters[1].is_full()
    await gateway.stop()  # 5 traces (10 spans) still buffered
    assert metric(gateway, "tailgate_exporter_failed_spans_total", exporter="otlp_http") == 0
    assert len(downstream.spans()) == 30


async def _post_in_two_parts(
    port: int, body: bytes, first_part_sent: asyncio.Event, go: asyncio.Event
) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/traces HTTP/1.1\r\nHost: tailgate\r\nContent-Type: application/x-protobuf\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body[:10])
    await writer.drain()
    first_part_sent.set()
    await go.wait()
    writer.write(body[10:])
    await writer.drain()
    reply = await reader.read(1000)
    writer.close()
    return reply


async def test_request_in_progress_completes_during_shutdown(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, decision_wait="60s", decision_wait_after_root_received="60s")
    config["shutdown_timeout"] = "2s"  # requests in progress get 0.5 s
    gateway = await start_gateway(config)
    assert gateway.receivers[0].port is not None
    body = make_request(traces=3, spans_per_trace=2).SerializeToString()
    first_part_sent, go = asyncio.Event(), asyncio.Event()
    client = asyncio.create_task(_post_in_two_parts(gateway.receivers[0].port, body, first_part_sent, go))
    await first_part_sent.wait()
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(gateway.stop())
    await asyncio.sleep(0.1)
    go.set()  # the rest of the body arrives while the gateway shuts down
    reply = await client
    await stopping
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert len(downstream.spans()) == 6


async def test_shutdown_while_many_traces_are_due_decides_them_all(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, decision_wait="0.05s", decision_tick="0.01s", policies=ERRORS_ONLY)
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=30_000, spans_per_trace=1))
    # All due: stop while the tick loop is deciding them, a slice at a time.
    decided = lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped")  # noqa: E731
    await wait_for(lambda: decided() > 0, interval=0)
    await gateway.stop()
    assert decided() == 30_000
    assert metric(gateway, "tailgate_buffered_traces") == 0
