"""Acceptance: a gateway with a small `memory.max_memory` under several times the load it can hold, while
its downstream is down (it accepts connections and answers nothing until released).

Memory stays within max_memory + 10 %, clients are told to come back later (429 with Retry-After, gRPC
RESOURCE_EXHAUSTED with RetryInfo, Zipkin 429), and stress relief turns on, then off once the downstream is
back and the traces drain. Run with `-s` to see the figures.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web
from google.rpc.code_pb2 import RESOURCE_EXHAUSTED
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from sampler.app import Gateway
from sampler.pressure import MemoryPressure
from tests.conftest import GatewayFactory, free_port, gateway_config, metric, wait_for
from tests.grpc_downstream import EXPORT
from tests.otlp_data import PROTOBUF, make_request

MiB = 1 << 20
MAX_MEMORY = 4 * MiB
CLIENTS = 8
REQUESTS_PER_CLIENT = 100
TRACES_PER_REQUEST = 10
SPANS_PER_TRACE = 5
PADDING = 300  # bytes of attribute per span, so that each span is about 400 bytes on the wire
REFUSED = "tailgate_receiver_rejected_requests_total"
DROPPED = "tailgate_exporter_dropped_spans_total"


class GatedDownstream:
    """An OTLP/HTTP backend that holds every request until `release()`, then answers each with 200."""

    def __init__(self) -> None:
        self.released = asyncio.Event()
        self.requests = 0
        self.bytes = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.released.wait()
        self.requests += 1
        self.bytes += len(body)
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    def release(self) -> None:
        self.released.set()

    async def __aenter__(self) -> GatedDownstream:
        app = web.Application(client_max_size=64 * MiB)
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def gated() -> AsyncIterator[GatedDownstream]:
    async with GatedDownstream() as server:
        yield server


def overload_config(downstream: GatedDownstream, max_memory: int, **memory: Any) -> dict[str, Any]:
    """A gateway whose traces wait 3 s for a decision, with one slow exporter and a small queue."""
    config = gateway_config(None, decision_wait="3s", decision_wait_after_root_received="3s")
    config["exporters"] = {
        "otlp_http": {
            "endpoint": downstream.endpoint,
            "compression": "none",
            "timeout": "30s",
            "batch": {"send_batch_size": 1000, "timeout": "0.02s", "queue_size": 3000, "num_consumers": 1},
            "retry_on_failure": {"initial_interval": "0.05s", "max_interval": "0.2s"},
        }
    }
    config["memory"] = {"max_memory": max_memory, "retry_after": "2s", **memory}
    return config


def request_body() -> bytes:
    """A serialized ExportTraceServiceRequest of new traces, a root and children each, padded."""
    request = make_request(TRACES_PER_REQUEST, SPANS_PER_TRACE)
    padding = KeyValue(key="payload", value=AnyValue(string_value="x" * PADDING))
    for span in request.resource_spans[0].scope_spans[0].spans:
        span.attributes.append(padding)
    return request.SerializeToString()


@dataclass
class Peaks:
    """The highest memory figures seen while sampling a gateway's gauges."""

    estimate: float = 0.0
    buffered_bytes: float = 0.0
    rss_growth: float = 0.0
    samples: int = 0

    async def sample(self, gateway: Gateway, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.estimate = max(self.estimate, metric(gateway, "tailgate_memory_estimate_bytes"))
            self.buffered_bytes = max(self.buffered_bytes, metric(gateway, "tailgate_buffered_bytes"))
            self.rss_growth = max(self.rss_growth, metric(gateway, "tailgate_memory_rss_growth_bytes"))
            self.samples += 1
            await asyncio.sleep(0.002)


@dataclass
class ClientReport:
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: set[str] = field(default_factory=set)
    refusals: list[Status] = field(default_factory=list)


async def drive(url: str, bodies: list[bytes], report: ClientReport) -> None:
    """Post every body once, back to back, whatever the replies: a client far faster than the gateway."""
    async with aiohttp.ClientSession() as session:
        for body in bodies:
            async with session.post(url, data=body, headers=PROTOBUF) as reply:
                report.statuses[reply.status] += 1
                content = await reply.read()
                if reply.status == 429:
                    report.retry_after.add(reply.headers.get("Retry-After", "missing"))
                    if len(report.refusals) < 3:
                        report.refusals.append(Status.FromString(content))


async def test_overload_keeps_memory_bounded_pushes_back_and_relieves_stress(
    gated: GatedDownstream, start_gateway: GatewayFactory
) -> None:
    bodies = [[request_body() for _ in range(REQUESTS_PER_CLIENT)] for _ in range(CLIENTS)]
    offered = sum(len(body) for client in bodies for body in client)
    gateway = await start_gateway(overload_config(gated, MAX_MEMORY))
    url = f"http://127.0.0.1:{gateway.receivers[0].port}/v1/traces"
    peaks = Peaks()
    stop_sampling = asyncio.Event()
    sampler = asyncio.create_task(peaks.sample(gateway, stop_sampling))
    reports = [ClientReport() for _ in range(CLIENTS)]

    await asyncio.gather(
        *(drive(url, client, report) for client, report in zip(bodies, reports, strict=True))
    )
    statuses = sum((report.statuses for report in reports), Counter[int]())
    activations = metric(gateway, "tailgate_stress_relief_activations_total")
    assert metric(gateway, "tailgate_stress_relief_active") == 1
    gated.release()  # the downstream is back
    await wait_for(lambda: metric(gateway, "tailgate_stress_relief_active") == 0, timeout=15)
    await wait_for(lambda: metric(gateway, "tailgate_memory_overloaded") == 0)
    stop_sampling.set()
    await sampler
    assert gated.requests > 0  # what was kept went out once the downstream was back

    limit = MAX_MEMORY * 1.1
    assert isinstance(gateway.pressure, MemoryPressure)
    monitor_peak = gateway.pressure.peak
    retry_after = set().union(*(report.retry_after for report in reports))
    print(
        f"\noffered {offered / MiB:.1f} MiB, {offered / MAX_MEMORY:.1f}x max_memory {MAX_MEMORY // MiB} MiB,"
        f" in {CLIENTS * REQUESTS_PER_CLIENT} requests from {CLIENTS} clients"
        f"\npeak memory estimate {peaks.estimate / MiB:.2f} MiB sampled ({peaks.samples} samples),"
        f" {monitor_peak / MiB:.2f} MiB seen by the monitor after each request;"
        f" limit + 10 % {limit / MiB:.2f} MiB"
        f"\npeak tailgate_buffered_bytes {peaks.buffered_bytes / MiB:.2f} MiB,"
        f" RSS growth (the test's clients included) {peaks.rss_growth / MiB:.2f} MiB"
        f"\nreplies {dict(statuses)}; Retry-After {sorted(retry_after)};"
        f" downstream got {gated.bytes / MiB:.2f} MiB in {gated.requests} requests once released;"
        f" the exporter refused {metric(gateway, DROPPED, exporter='otlp_http'):.0f} spans when it filled"
        f"\nstress relief activations {activations:.0f}; traces decided by hash"
        f" {metric(gateway, 'tailgate_stress_relief_traces_total', decision='kept'):.0f} kept,"
        f" {metric(gateway, 'tailgate_stress_relief_traces_total', decision='dropped'):.0f} dropped;"
        f" decided early for memory"
        f" {metric(gateway, 'tailgate_traces_decided_early_total', reason='max_memory'):.0f}"
    )
    assert peaks.estimate <= limit
    assert monitor_peak <= limit
    assert peaks.buffered_bytes <= limit
    assert statuses[429] > 0
    assert statuses[200] > 0
    assert statuses.keys() <= {200, 429}
    assert retry_after == {"2"}
    refusal = next(status for report in reports for status in report.refusals)
    assert refusal.code == RESOURCE_EXHAUSTED
    assert "retry later" in refusal.message
    assert metric(gateway, REFUSED, protocol="otlp_http", reason="overloaded") == statuses[429]
    assert activations >= 1
    assert metric(gateway, "tailgate_stress_relief_active") == 0


async def test_grpc_and_zipkin_clients_are_refused_with_a_retry_delay_while_overloaded(
    gated: GatedDownstream, start_gateway: GatewayFactory
) -> None:
    config = overload_config(gated, MiB)
    config["receivers"] = {
        "otlp": {"grpc": {"endpoint": f"127.0.0.1:{free_port()}"}},
        "zipkin": {"endpoint": f"127.0.0.1:{free_port()}"},
    }
    gateway = await start_gateway(config)
    grpc_port, zipkin_port = (receiver.port for receiver in gateway.receivers)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        export = channel.unary_unary(EXPORT)
        calls = 0
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            while calls < 1000:  # far more than 1 MiB
                await export(request_body(), timeout=5)
                calls += 1
        error = refused.value
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(error.trailing_metadata())
        status = Status.FromString(trailers["grpc-status-details-bin"])
        retry_info = RetryInfo()
        assert status.details[0].Unpack(retry_info)
        assert retry_info.retry_delay.ToTimedelta().total_seconds() == 2.0
        assert RetryInfo.FromString(trailers["google.rpc.retryinfo-bin"]) == retry_info

        zipkin = f"http://127.0.0.1:{zipkin_port}/api/v2/spans"
        async with aiohttp.ClientSession() as session, session.post(zipkin, json=[]) as reply:
            assert reply.status == 429
            assert reply.headers["Retry-After"] == "2"
        print(f"\ngRPC refused after {calls} accepted calls ({calls * len(request_body()) / MiB:.2f} MiB)")
        assert metric(gateway, REFUSED, protocol="otlp_grpc", reason="overloaded") == 1
        assert metric(gateway, REFUSED, protocol="zipkin", reason="overloaded") == 1

        gated.release()
        await wait_for(lambda: metric(gateway, "tailgate_memory_overloaded") == 0)
        assert await export(request_body(), timeout=5) == b""
