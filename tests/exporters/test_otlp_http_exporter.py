"""The OTLP/HTTP exporter against a real downstream: batching, gzip, retries, limits, shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.config import BatchConfig, OTLPHTTPExporterConfig, RetryConfig
from sampler.exporters.otlp_http import OTLPHTTPExporter, parse_retry_after
from sampler.metrics import Metrics
from tests.conftest import free_port

from .helpers import (
    Downstream,
    Reply,
    eventually,
    make_group,
    make_scope,
    make_trace,
    sample,
)

NAME = "otlp_http/backend"
SENT = "tailgate_exporter_sent_spans_total"
FAILED = "tailgate_exporter_failed_spans_total"
DROPPED = "tailgate_exporter_dropped_spans_total"
RETRIES = "tailgate_exporter_retries_total"
QUEUE = "tailgate_exporter_queue_spans"

SERVICE = make_scope("checkout")


def exporter_for(
    url: str,
    metrics: Metrics,
    *,
    batch: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    **options: Any,
) -> OTLPHTTPExporter:
    batch_options = {"send_batch_size": 1000, "timeout": 0.02, **(batch or {})}
    retry_options = {"initial_interval": 0.02, "max_interval": 0.05, "max_elapsed_time": 1.0}
    config = OTLPHTTPExporterConfig(
        endpoint=url,
        batch=BatchConfig(**batch_options),
        retry_on_failure=RetryConfig(**{**retry_options, **(retry or {})}),
        **options,
    )
    return OTLPHTTPExporter(NAME, config, metrics)


def export_traces(exporter: OTLPHTTPExporter, first: int, count: int, spans: int) -> list[Span]:
    """Export `count` traces of `spans` spans, one call per trace as the decider does."""
    sent: list[Span] = []
    for number in range(first, first + count):
        trace = make_trace(number, spans)
        exporter.export([make_group(SERVICE, trace)], len(trace))
        sent.extend(trace)
    return sent


def ids(spans: list[Span]) -> list[tuple[bytes, bytes]]:
    return sorted((span.trace_id, span.span_id) for span in spans)


async def test_batch_sealed_by_size_sends_at_once(downstream: Downstream, metrics: Metrics) -> None:
    exporter = exporter_for(downstream.url, metrics, batch={"send_batch_size": 10, "timeout": 10})
    await exporter.start()
    sent = export_traces(exporter, 1, 5, 2)
    await eventually(lambda: len(downstream.delivered) == 1, within=0.5)
    assert downstream.delivered_spans() == sent
    assert sample(metrics, SENT, NAME) == 10
    await exporter.shutdown(1)
    assert len(downstream.attempts) == 1


async def test_batch_sealed_by_time(downstream: Downstream, metrics: Metrics) -> None:
    exporter = exporter_for(downstream.url, metrics, batch={"timeout": 0.1})
    await exporter.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    sent = export_traces(exporter, 1, 3, 4)
    await asyncio.sleep(0.05)
    assert downstream.attempts == []
    await eventually(lambda: len(downstream.delivered) == 1)
    assert downstream.attempts[0].at - began >= 0.09
    assert ids(downstream.delivered_spans()) == ids(sent)
    assert downstream.delivered_spans() == sent
    await exporter.shutdown(1)
    assert sample(metrics, SENT, NAME) == 12
    assert len(downstream.attempts) == 1


@pytest.mark.parametrize("compression", ["gzip", "none"])
async def test_compression(downstream: Downstream, metrics: Metrics, compression: str) -> None:
    exporter = exporter_for(downstream.url, metrics, compression=compression)
    await exporter.start()
    sent = export_traces(exporter, 1, 2, 3)
    await exporter.shutdown(1)
    (attempt,) = downstream.attempts
    assert attempt.headers["Content-Type"] == "application/x-protobuf"
    if compression == "gzip":
        assert attempt.headers["Content-Encoding"] == "gzip"
        assert attempt.raw_body[:2] == b"\x1f\x8b"
    else:
        assert "Content-Encoding" not in attempt.headers
        assert attempt.raw_body == attempt.request.SerializeToString()
    assert downstream.delivered_spans() == sent


async def test_large_body_is_gzipped(downstream: Downstream, metrics: Metrics) -> None:
    exporter = exporter_for(downstream.url, metrics)
    await exporter.start()
    trace = make_trace(1, 4, padding=40_000)
    exporter.export([make_group(SERVICE, trace)], len(trace))
    await exporter.shutdown(1)
    (attempt,) = downstream.attempts
    assert len(attempt.request.SerializeToString()) > 150_000
    assert len(attempt.raw_body) < 10_000
    assert downstream.delivered_spans() == trace


async def test_configured_headers_sent(downstream: Downstream, metrics: Metrics) -> None:
    headers = {"Authorization": "Bearer s3cret", "X-Scope-OrgID": "tenant-1"}
    exporter = exporter_for(downstream.url, metrics, headers=headers)
    await exporter.start()
    export_traces(exporter, 1, 1, 1)
    await exporter.shutdown(1)
    (attempt,) = downstream.attempts
    assert attempt.headers["Authorization"] == "Bearer s3cret"
    assert attempt.headers["X-Scope-OrgID"] == "tenant-1"


async def test_groups_of_one_scope_merge(downstream: Downstream, metrics: Metrics) -> None:
    exporter = exporter_for(downstream.url, metrics)
    await exporter.start()
    cart = make_scope("cart")
    first, second, third = make_trace(1, 2), make_trace(2, 1), make_trace(3, 3)
    exporter.export([make_group(SERVICE, first), make_group(cart, second)], 3)
    exporter.export([make_group(SERVICE, third)], 3)
    await exporter.shutdown(1)
    (request,) = downstream.delivered
    by_service = {
        resource_spans.resource.attributes[0].value.string_value: list(resource_spans.scope_spans[0].spans)
        for resource_spans in request.resource_spans
    }
    assert by_service == {"checkout": first + third, "cart": second}


async def test_retry_after_is_honored(downstream: Downstream, metrics: Metrics) -> None:
    downstream.replies = [Reply(503, {"Retry-After": "1"})]
    exporter = exporter_for(downstream.url, metrics, retry={"max_elapsed_time": 5})
    await exporter.start()
    sent = export_traces(exporter, 1, 2, 2)
    await exporter.shutdown(3)
    first, second = downstream.attempts
    assert second.at - first.at >= 0.95
    assert sample(metrics, RETRIES, NAME) == 1
    assert sample(metrics, SENT, NAME) == 4
    assert downstream.delivered_spans() == sent


@pytest.mark.parametrize(
    ("header", "expected"),
    # "²" is a digit to str.isdigit() and not to float().
    [("3", 3.0), (" 0 ", 0.0), ("soon", None), (None, None), ("-1", None), ("\u00b2", None)],
)
def test_parse_retry_after_seconds(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header) == expected


def test_parse_retry_after_http_date() -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    delay = parse_retry_after(format_datetime(when, usegmt=True))
    assert delay is not None
    assert 28 <= delay <= 30
    past = format_datetime(datetime.now(UTC) - timedelta(minutes=1), usegmt=True)
    assert parse_retry_after(past) == 0.0


async def test_retryable_statuses_then_success(downstream: Downstream, metrics: Metrics) -> None:
    downstream.replies = [Reply(502), Reply(504), Reply(429)]
    exporter = exporter_for(downstream.url, metrics)
    await exporter.start()
    sent = export_traces(exporter, 1, 3, 1)
    await exporter.shutdown(1)
    assert len(downstream.attempts) == 4
    assert downstream.delivered_spans() == sent
    assert sample(metrics, RETRIES, NAME) == 3
    assert sample(metrics, SENT, NAME) == 3
    assert sample(metrics, FAILED, NAME) == 0


async def test_connection_refused_until_server_comes_up(
    make_downstream: Callable[[int], Awaitable[Downstream]], metrics: Metrics
) -> None:
    port = free_port()
    exporter = exporter_for(f"http://127.0.0.1:{port}/v1/traces", metrics)
    await exporter.start()
    sent = export_traces(exporter, 1, 2, 2)
    await eventually(lambda: sample(metrics, RETRIES, NAME) >= 2)
    server = await make_downstream(port)
    await exporter.shutdown(1)
    assert server.delivered_spans() == sent
    assert sample(metrics, SENT, NAME) == 4
    assert sample(metrics, FAILED, NAME) == 0


async def test_non_retryable_status_fails_without_retry(
    downstream: Downstream, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    # A google.rpc.Status with message "span name too long" (field 2).
    status = b"\x08\x03\x12\x12span name too long"
    downstream.replies = [Reply(400, body=status)]
    exporter = exporter_for(downstream.url, metrics)
    await exporter.start()
    with caplog.at_level(logging.WARNING):
        export_traces(exporter, 1, 2, 3)
        await exporter.shutdown(1)
    assert len(downstream.attempts) == 1
    assert sample(metrics, FAILED, NAME) == 6
    assert sample(metrics, RETRIES, NAME) == 0
    assert sample(metrics, SENT, NAME) == 0
    assert "HTTP 400" in caplog.text
    assert "span name too long" in caplog.text


async def test_gives_up_after_max_elapsed_time(downstream: Downstream, metrics: Metrics) -> None:
    downstream.replies = [Reply(503)] * 100
    exporter = exporter_for(downstream.url, metrics, retry={"max_elapsed_time": 0.3})
    await exporter.start()
    began = asyncio.get_running_loop().time()
    export_traces(exporter, 1, 1, 5)
    await exporter.shutdown(2)
    assert asyncio.get_running_loop().time() - began < 1
    assert downstream.delivered == []
    assert sample(metrics, FAILED, NAME) == 5
    assert sample(metrics, RETRIES, NAME) == len(downstream.attempts) - 1 >= 3


async def test_retry_after_beyond_max_elapsed_time_gives_up(downstream: Downstream, metrics: Metrics) -> None:
    downstream.replies = [Reply(429, {"Retry-After": "30"})]
    exporter = exporter_for(downstream.url, metrics, retry={"max_elapsed_time": 5})
    await exporter.start()
    export_traces(exporter, 1, 1, 2)
    await exporter.shutdown(1)
    assert len(downstream.attempts) == 1
    assert sample(metrics, FAILED, NAME) == 2


async def test_retries_disabled(downstream: Downstream, metrics: Metrics) -> None:
    downstream.replies = [Reply(503)]
    exporter = exporter_for(downstream.url, metrics, retry={"enabled": False})
    await exporter.start()
    export_traces(exporter, 1, 1, 2)
    await exporter.shutdown(1)
    assert len(downstream.attempts) == 1
    assert sample(metrics, FAILED, NAME) == 2
    assert sample(metrics, RETRIES, NAME) == 0


async def test_request_timeout_is_retried(downstream: Downstream, metrics: Metrics) -> None:
    downstream.hang = True
    exporter = exporter_for(downstream.url, metrics, timeout=0.05, retry={"max_elapsed_time": 0.3})
    await exporter.start()
    export_traces(exporter, 1, 1, 2)
    await exporter.shutdown(2)
    assert len(downstream.attempts) >= 2
    assert sample(metrics, RETRIES, NAME) >= 1
    assert sample(metrics, FAILED, NAME) == 2


async def test_queue_full_drops_and_counts(
    downstream: Downstream, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = exporter_for(downstream.url, metrics, batch={"queue_size": 10, "timeout": 10})
    await exporter.start()
    with caplog.at_level(logging.WARNING):
        kept = export_traces(exporter, 1, 2, 4)
        export_traces(exporter, 3, 2, 4)  # 8 queued + 4 > 10: both refused
        kept += export_traces(exporter, 5, 1, 2)  # exactly 10: accepted
    assert sample(metrics, DROPPED, NAME) == 8
    assert sample(metrics, QUEUE, NAME) == 10
    assert caplog.text.count("queue full") == 1  # the second drop is rate-limited
    await exporter.shutdown(1)
    assert downstream.delivered_spans() == kept
    assert sample(metrics, QUEUE, NAME) == 0


async def test_queue_counts_spans_in_flight(downstream: Downstream, metrics: Metrics) -> None:
    downstream.hang = True
    exporter = exporter_for(downstream.url, metrics, batch={"queue_size": 6, "send_batch_size": 3})
    await exporter.start()
    export_traces(exporter, 1, 2, 3)
    await eventually(lambda: len(downstream.attempts) == 2)
    export_traces(exporter, 3, 1, 1)
    assert sample(metrics, DROPPED, NAME) == 1
    downstream.release.set()
    await exporter.shutdown(1)
    assert sample(metrics, SENT, NAME) == 6


async def test_senders_run_concurrently(downstream: Downstream, metrics: Metrics) -> None:
    downstream.hang = True
    exporter = exporter_for(downstream.url, metrics, batch={"send_batch_size": 1, "num_consumers": 2})
    await exporter.start()
    export_traces(exporter, 1, 3, 1)
    await eventually(lambda: len(downstream.attempts) == 2)
    await asyncio.sleep(0.05)
    assert len(downstream.attempts) == 2  # the third batch waits for a free sender
    downstream.release.set()
    await exporter.shutdown(1)
    assert sample(metrics, SENT, NAME) == 3


async def test_shutdown_flushes_open_batch(downstream: Downstream, metrics: Metrics) -> None:
    exporter = exporter_for(downstream.url, metrics, batch={"timeout": 10})
    await exporter.start()
    sent = export_traces(exporter, 1, 3, 2)
    began = asyncio.get_running_loop().time()
    await exporter.shutdown(1)
    assert asyncio.get_running_loop().time() - began < 0.5
    assert downstream.delivered_spans() == sent
    export_traces(exporter, 4, 1, 2)
    assert sample(metrics, DROPPED, NAME) == 2


async def test_shutdown_timeout_counts_undelivered_as_failed(
    downstream: Downstream, metrics: Metrics
) -> None:
    downstream.hang = True
    exporter = exporter_for(downstream.url, metrics, batch={"send_batch_size": 2, "num_consumers": 1})
    await exporter.start()
    export_traces(exporter, 1, 3, 2)  # one batch in flight, two waiting
    await eventually(lambda: len(downstream.attempts) == 1)
    began = asyncio.get_running_loop().time()
    await exporter.shutdown(0.2)
    assert asyncio.get_running_loop().time() - began < 0.5
    assert sample(metrics, FAILED, NAME) == 6
    assert sample(metrics, SENT, NAME) == 0
    assert sample(metrics, QUEUE, NAME) == 0


async def test_partial_success_counts_rejected(
    downstream: Downstream, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    downstream.success_body = ExportTraceServiceResponse(
        partial_success=ExportTracePartialSuccess(rejected_spans=2, error_message="too old")
    ).SerializeToString()
    exporter = exporter_for(downstream.url, metrics)
    await exporter.start()
    with caplog.at_level(logging.WARNING):
        export_traces(exporter, 1, 1, 5)
        await exporter.shutdown(1)
    assert sample(metrics, SENT, NAME) == 3
    assert sample(metrics, FAILED, NAME) == 2
    assert "rejected 2 of 5 spans: too old" in caplog.text


@pytest.fixture
async def moved_downstream(downstream: Downstream) -> AsyncIterator[tuple[str, list[tuple[str, int]]]]:
    """An endpoint that moved (301) to a place answering 200 to anything, as many front ends do; what
    arrives there as (method, body length)."""
    arrived: list[tuple[str, int]] = []

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPMovedPermanently("/new/v1/traces")

    async def new(request: web.Request) -> web.Response:
        arrived.append((request.method, len(await request.read())))
        return web.Response(status=200, body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", moved)
    app.router.add_route("*", "/new/v1/traces", new)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1/traces", arrived
    await runner.cleanup()


async def test_a_redirect_is_a_failure_not_a_delivery(
    moved_downstream: tuple[str, list[tuple[str, int]]], metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    """Followed, a 301 turned the POST into a GET without the body, whose 200 counted as delivery."""
    url, arrived = moved_downstream
    exporter = exporter_for(url, metrics)
    await exporter.start()
    export_traces(exporter, 1, 1, 2)
    await eventually(lambda: sample(metrics, SENT, NAME) + sample(metrics, FAILED, NAME) == 2)
    await exporter.shutdown(1)
    assert arrived == []
    assert sample(metrics, SENT, NAME) == 0
    assert sample(metrics, FAILED, NAME) == 2
    assert "HTTP 301: redirected to /new/v1/traces; redirects are not followed" in caplog.text
