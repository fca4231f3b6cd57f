"""Zipkin test data and peers: the real v2 data files, gateway configs with the Zipkin receiver, Zipkin
clients (the OTel SDK's Zipkin exporter, py_zipkin) and a Zipkin v2 server on loopback."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy
from opentelemetry.exporter.zipkin.json import ZipkinExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sampler.app import Gateway
from tests.conftest import ROOT, Downstream, free_port, gateway_config
from tests.exporters.helpers import Reply

DATA = ROOT / "tests" / "data" / "zipkin"
DATA_FILES = ("yelp", "envoy", "messaging")
JSON = {"Content-Type": "application/json"}
PROTOBUF = {"Content-Type": "application/x-protobuf"}


def data_body(name: str) -> bytes:
    """A data file as it is, to post to `/api/v2/spans`."""
    return (DATA / f"{name}.json").read_bytes()


def data_spans(name: str) -> list[dict[str, Any]]:
    spans: list[dict[str, Any]] = json.loads(data_body(name))
    return spans


def trace_id(zipkin_hex: str) -> bytes:
    """The OTLP trace id of a Zipkin one: a 64-bit id left-padded with zeros to 16 bytes."""
    return bytes.fromhex(zipkin_hex).rjust(16, b"\x00")


def zipkin_config(downstream: Downstream | None, **sampling: Any) -> dict[str, Any]:
    """`gateway_config` with the Zipkin receiver on a free port as well.

    Every test sends each trace's root span last, so traces are decided soon after it.
    """
    config = gateway_config(downstream, **{"decision_wait_after_root_received": "0.05s", **sampling})
    config["receivers"]["zipkin"] = {"endpoint": f"127.0.0.1:{free_port()}"}
    return config


def zipkin_port(gateway: Gateway) -> int:
    (port,) = [receiver.port for receiver in gateway.receivers if receiver.protocol == "zipkin"]
    assert port is not None
    return port


def zipkin_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{zipkin_port(gateway)}/api/v2/spans"


def sdk_provider(url: str, service: str) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A TracerProvider that sends each ended span with the OTel Zipkin JSON exporter, and keeps a copy."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(ZipkinExporter(endpoint=url, timeout=5)))
    copies = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(copies))
    return provider, copies


def sent_spans(copies: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(copies.get_finished_spans())


@dataclass
class Post:
    """One POST the Zipkin server received, whatever it replied."""

    headers: CIMultiDictProxy[str]
    raw_body: bytes
    spans: list[dict[str, Any]]
    accepted: bool


class ZipkinServer:
    """A Zipkin v2 collector endpoint on loopback: `POST /api/v2/spans` decoded as JSON, replies from a
    script (then 202), every request recorded. Runs as an async context manager."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.replies: list[Reply] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/api/v2/spans", self._handle)
        self._server = TestServer(app)

    @property
    def url(self) -> str:
        return str(self._server.make_url("/api/v2/spans"))

    def spans(self) -> list[dict[str, Any]]:
        """Every span of the requests answered with 202."""
        return [span for post in self.posts if post.accepted for span in post.spans]

    async def __aenter__(self) -> ZipkinServer:
        # Not decompressed by aiohttp: the tests check what the exporter put on the wire.
        await self._server.start_server(auto_decompress=False)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._server.close()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = gzip.decompress(raw) if request.headers.get("Content-Encoding") == "gzip" else raw
        reply = self.replies.pop(0) if self.replies else Reply(202)
        self.posts.append(Post(request.headers, raw, json.loads(body), reply.status == 202))
        return web.Response(status=reply.status, headers=reply.headers, body=reply.body)
