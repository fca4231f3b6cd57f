"""A cheap downstream OTLP/HTTP backend for benchmarks: accepts POST /v1/traces, counts, replies 200.

Per request it only counts bytes; it keeps bodies up to a memory cap and decodes them to count spans
when `GET /stats` asks (`?reset=1` also zeroes the counts), extrapolating by bytes past the cap.
"""

from __future__ import annotations

import argparse
import gzip

import uvloop
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from serving import serve_app

RESPONSE_BODY = ExportTraceServiceResponse().SerializeToString()
MAX_REQUEST_BYTES = 64 * 1024 * 1024


class Backend:
    """Counts what arrives; `stats` decodes the kept bodies, which is off the request path."""

    def __init__(self, keep_bytes: int) -> None:
        self.keep_bytes = keep_bytes
        self.requests = 0
        self.bytes = 0
        self.kept: list[tuple[bytes, bool]] = []  # (body, gzipped)
        self.kept_bytes = 0
        self.decoded_spans = 0
        self.decoded_bytes = 0

    async def handle_traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests += 1
        self.bytes += len(body)
        if self.kept_bytes + len(body) <= self.keep_bytes:
            self.kept.append((body, request.headers.get("Content-Encoding", "") == "gzip"))
            self.kept_bytes += len(body)
        return web.Response(body=RESPONSE_BODY, content_type="application/x-protobuf")

    async def handle_stats(self, request: web.Request) -> web.Response:
        for body, gzipped in self.kept:
            message = ExportTraceServiceRequest.FromString(gzip.decompress(body) if gzipped else body)
            self.decoded_spans += sum(
                len(scope_spans.spans)
                for resource_spans in message.resource_spans
                for scope_spans in resource_spans.scope_spans
            )
            self.decoded_bytes += len(body)
        self.kept.clear()
        exact = self.decoded_bytes == self.bytes
        spans = (
            self.decoded_spans
            if exact
            else round(self.decoded_spans * self.bytes / max(self.decoded_bytes, 1))
        )
        stats = {"requests": self.requests, "bytes": self.bytes, "spans": spans, "spans_exact": exact}
        if request.query.get("reset"):  # the next run counts from zero
            self.requests = self.bytes = self.kept_bytes = self.decoded_spans = self.decoded_bytes = 0
        return web.json_response(stats)


async def serve(host: str, port: int, keep_bytes: int) -> None:
    backend = Backend(keep_bytes)
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    app.router.add_post("/v1/traces", backend.handle_traces)
    app.router.add_get("/stats", backend.handle_stats)
    await serve_app(app, host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4319)
    parser.add_argument("--keep-mb", type=int, default=128, help="bodies kept for span counting at /stats")
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, args.keep_mb * 1024 * 1024))


if __name__ == "__main__":
    main()
