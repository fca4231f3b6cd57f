"""Shared fixtures: a real OTLP/HTTP downstream, in-process gateways on free loopback ports."""

from __future__ import annotations

import asyncio
import gzip
import random
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.app import Gateway

if TYPE_CHECKING:
    from tests.grpc_downstream import GRPCDownstream
from sampler.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
TAILGATE = [sys.executable, "-m", "sampler"]


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return range(32768, 61000)
    return range(low, high + 1)


_EPHEMERAL = _ephemeral_ports()
# Below the kernel's ephemeral range: a port handed out here and bound later (a member that joins
# during a test) cannot meanwhile become the local port of some outgoing connection.
_PORTS = range(10_000, _EPHEMERAL.start) if _EPHEMERAL.start > 12_000 else range(0)
_handed_out: set[int] = set()
_port_rng = random.Random()


def free_port() -> int:
    """A loopback TCP port nothing is bound to, not handed out before in this test run."""
    for _ in range(200):
        port = _port_rng.choice(_PORTS) if _PORTS else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free loopback port found")


class Downstream:
    """An OTLP/HTTP backend on loopback that decodes every request it gets with opentelemetry-proto."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.requests.append(ExportTraceServiceRequest.FromString(body))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._handle)
        # Decompressed here, to check what the gateway put on the wire.
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def spans(self) -> list[tuple[Any, Any, Span]]:
        """Every span received, with its resource and scope."""
        return [
            (rs.resource, ss.scope, span)
            for request in self.requests
            for rs in request.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def kept_by(self) -> dict[bytes, set[str]]:
        """Per trace id, the `tailsampling.policy` values on the scopes its spans arrived under."""
        policies: dict[bytes, set[str]] = {}
        for _, scope, span in self.spans():
            names = policies.setdefault(span.trace_id, set())
            names.update(kv.value.string_value for kv in scope.attributes if kv.key == "tailsampling.policy")
        return policies

    def spans_by_trace(self) -> dict[bytes, list[Span]]:
        traces: dict[bytes, list[Span]] = {}
        for _, _, span in self.spans():
            traces.setdefault(span.trace_id, []).append(span)
        return traces


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    server = Downstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def grpc_downstream() -> AsyncIterator[GRPCDownstream]:
    """A real OTLP/gRPC backend on loopback (tests/grpc_downstream.py)."""
    from tests.grpc_downstream import GRPCDownstream

    async with GRPCDownstream() as server:
        yield server


def gateway_config(downstream: Downstream | None, **sampling: Any) -> dict[str, Any]:
    """A config dict for a test gateway: free ports, short windows, the given tail_sampling keys."""
    tail_sampling: dict[str, Any] = {
        "decision_wait": "1s",
        "decision_wait_after_root_received": "0.2s",
        "decision_tick": "0.02s",
        # Off, so that tests can compare kept spans field by field; tests/test_adjusted_counts.py turns it on.
        "adjusted_counts": False,
        "policies": [{"name": "all", "type": "always_sample"}],
    }
    tail_sampling.update(sampling)
    exporters: dict[str, Any] = {}
    if downstream is not None:
        exporters["otlp_http"] = {
            "endpoint": downstream.endpoint,
            "compression": "gzip",
            "batch": {"timeout": "0.02s"},
            "retry_on_failure": {"initial_interval": "0.05s", "max_interval": "0.2s"},
        }
    return {
        "receivers": {"otlp": {"http": {"endpoint": f"127.0.0.1:{free_port()}"}}},
        "admin": {"endpoint": f"127.0.0.1:{free_port()}"},
        "tail_sampling": tail_sampling,
        "exporters": exporters,
        "shutdown_timeout": "5s",
    }


GatewayFactory = Callable[[dict[str, Any]], Awaitable[Gateway]]


@pytest.fixture
async def start_gateway() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def start(config: dict[str, Any]) -> Gateway:
        gateway = Gateway(parse_config(config))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.ready:
            await gateway.stop()


def receiver_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.receivers[0].port}/v1/traces"


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    value = gateway.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll until `condition()` holds; fails the test after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
