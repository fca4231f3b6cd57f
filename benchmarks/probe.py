"""The limit probe: an aiohttp + uvloop OTLP/HTTP server that parses and groups spans by trace id.

It is the least work any tail sampler on this stack must do, so gateway/probe isolates the pipeline's
own cost. `--mode empty` only reads the body: the ceiling of the server stack and the load generator.
`--mode grpc-empty` answers OTLP/gRPC Export calls without reading them: the ceiling of grpc.aio.
"""

from __future__ import annotations

import argparse

import grpc
import uvloop
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from serving import serve_app

RESPONSE_BODY = ExportTraceServiceResponse().SerializeToString()
PROTOBUF = "application/x-protobuf"
MAX_REQUEST_BYTES = 16 * 1024 * 1024


class SpanGrouper:
    """Keeps parsed spans grouped per trace id; starts over past `max_traces` so memory stays flat.

    The small default keeps the freed parse arenas in the allocator's reach: holding ~25k traces of
    parsed spans halves the rate (fresh pages, longer GC passes). The cheapest probe is the strictest
    denominator for the gateway's ratio.
    """

    def __init__(self, max_traces: int) -> None:
        self.max_traces = max_traces
        self.traces: dict[bytes, list[Span]] = {}
        self.spans = 0

    async def handle_traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        try:
            message = ExportTraceServiceRequest.FromString(body)
        except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass
            raise web.HTTPBadRequest(text=f"malformed OTLP request: {exc}") from exc
        traces = self.traces
        count = 0
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    group = traces.get(span.trace_id)
                    if group is None:
                        traces[span.trace_id] = [span]
                    else:
                        group.append(span)
                count += len(scope_spans.spans)
        self.spans += count
        if len(traces) > self.max_traces:
            self.traces = {}
        return web.Response(body=RESPONSE_BODY, content_type=PROTOBUF)


async def handle_empty(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=RESPONSE_BODY, content_type=PROTOBUF)


async def _empty_export(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return RESPONSE_BODY


async def serve_grpc_empty(host: str, port: int, ready_port: int) -> None:
    """Answer Export calls on `port` with an empty reply; /readyz over HTTP on `ready_port`."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    handler = grpc.unary_unary_rpc_method_handler(_empty_export)
    service = "opentelemetry.proto.collector.trace.v1.TraceService"
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"Export": handler}),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    try:
        await serve_app(web.Application(), host, ready_port)
    finally:
        await server.stop(0)


async def serve(host: str, port: int, mode: str, max_traces: int) -> None:
    app = web.Application(client_max_size=MAX_REQUEST_BYTES)
    if mode == "group":
        app.router.add_post("/v1/traces", SpanGrouper(max_traces).handle_traces)
    else:
        app.router.add_post("/v1/traces", handle_empty)
    await serve_app(app, host, port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--mode", choices=("group", "empty", "grpc-empty"), default="group")
    parser.add_argument("--ready-port", type=int, help="/readyz port in grpc-empty mode")
    parser.add_argument("--max-traces", type=int, default=2048, help="traces held before the groups reset")
    args = parser.parse_args()
    if args.mode == "grpc-empty":
        uvloop.run(serve_grpc_empty(args.host, args.port, args.ready_port))
    else:
        uvloop.run(serve(args.host, args.port, args.mode, args.max_traces))


if __name__ == "__main__":
    main()
