"""Helpers for exporter tests: real spans in wire form and a real OTLP/HTTP downstream."""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from multidict import CIMultiDictProxy
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler import otlp_wire
from sampler.metrics import Metrics
from sampler.otlp_wire import Scope, SpanGroup


def make_scope(service: str, scope_name: str = "tests") -> Scope:
    resource = Resource(attributes=[KeyValue(key="service.name", value=AnyValue(string_value=service))])
    scope = InstrumentationScope(name=scope_name, version="1.0")
    return Scope(
        resource=otlp_wire.frame(otlp_wire.TAG_RESOURCE, resource.SerializeToString()),
        scope=otlp_wire.frame(otlp_wire.TAG_SCOPE, scope.SerializeToString()),
    )


def make_trace(trace_number: int, span_count: int, *, padding: int = 0) -> list[Span]:
    """Spans of one trace: a root and children, with distinct ids derived from the trace number."""
    # A leading 0xfe gives hex letters, to check the file exporter writes them lower-case.
    trace_id = b"\xfe" + trace_number.to_bytes(15, "big")
    spans: list[Span] = []
    for index in range(span_count):
        span_id = (trace_number * 1000 + index + 1).to_bytes(8, "big")
        span = Span(
            trace_id=trace_id,
            span_id=span_id,
            parent_span_id=spans[0].span_id if spans else b"",
            name=f"op-{trace_number}-{index}",
            kind=Span.SPAN_KIND_SERVER,
            start_time_unix_nano=1_700_000_000_000_000_000 + index,
            end_time_unix_nano=1_700_000_000_000_001_000 + index,
        )
        if padding:
            span.attributes.append(KeyValue(key="payload", value=AnyValue(string_value="x" * padding)))
        if index == 1:
            link = span.links.add()
            link.trace_id = b"\xab" * 16
            link.span_id = b"\xcd" * 8
        spans.append(span)
    return spans


def make_group(scope: Scope, spans: list[Span]) -> SpanGroup:
    entries = b"".join(otlp_wire.frame(otlp_wire.TAG_SPANS, span.SerializeToString()) for span in spans)
    return (scope, entries, len(spans))


def sample(metrics: Metrics, name: str, exporter: str) -> float:
    """A counter's value for one exporter, 0 when never incremented."""
    value = metrics.registry.get_sample_value(name, {"exporter": exporter})
    return 0.0 if value is None else value


async def eventually(predicate: Callable[[], bool], within: float = 1.5) -> None:
    """Wait until `predicate()` holds, polling (metrics have no event to await)."""
    step = 0.005
    for _ in range(int(within / step)):
        if predicate():
            return
        await asyncio.sleep(step)
    assert predicate(), f"condition not reached within {within}s"


@dataclass
class Attempt:
    """One POST the downstream received, whatever it replied."""

    at: float
    headers: CIMultiDictProxy[str]
    raw_body: bytes
    request: ExportTraceServiceRequest


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Downstream:
    """An OTLP/HTTP trace receiver: replies from a script (then 200) and records what it got."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []
        self.replies: list[Reply] = []
        self.success_body = b""
        self.hang = False
        self.release = asyncio.Event()
        self.port = 0
        self._accepted: list[bool] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    @property
    def delivered(self) -> list[ExportTraceServiceRequest]:
        """Requests answered with 200, i.e. delivered."""
        return [a.request for a, ok in zip(self.attempts, self._accepted, strict=True) if ok]

    def delivered_spans(self) -> list[Span]:
        return [
            span
            for request in self.delivered
            for resource_spans in request.resource_spans
            for scope_spans in resource_spans.scope_spans
            for span in scope_spans.spans
        ]

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        # auto_decompress off: the test checks the exporter really sent gzip.
        self._runner = web.AppRunner(
            app, auto_decompress=False, shutdown_timeout=0.1, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, http_request: web.Request) -> web.Response:
        raw = await http_request.read()
        gzipped = http_request.headers.get("Content-Encoding") == "gzip"
        body = gzip.decompress(raw) if gzipped else raw
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        loop = asyncio.get_running_loop()
        self.attempts.append(Attempt(loop.time(), http_request.headers, raw, request))
        self._accepted.append(False)
        if self.hang:
            await self.release.wait()
        reply = self.replies.pop(0) if self.replies else Reply(200, body=self.success_body)
        self._accepted[-1] = reply.status == 200
        return web.Response(
            status=reply.status,
            headers=reply.headers,
            body=reply.body,
            content_type="application/x-protobuf",
        )
