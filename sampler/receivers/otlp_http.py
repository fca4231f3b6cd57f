"""OTLP/HTTP trace receiver: `POST /v1/traces` in protobuf or JSON, optionally gzip-compressed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.buffer import IngestResult, SpanBatch
from sampler.config import OTLPHTTPReceiverConfig
from sampler.errors import DecodeError
from sampler.receivers.common import OVERLOADED, Ingest, Unavailable, retry_after_header
from sampler.receivers.http_server import HTTPReceiver, RequestRejected
from sampler.receivers.otlp_decode import decode_json, decode_protobuf

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
PROTOCOL = "otlp_http"
# google.rpc.Code values used in error replies.
_INVALID_ARGUMENT = 3
_RESOURCE_EXHAUSTED = 8
_UNAVAILABLE = 14
_UNAUTHENTICATED = 16
# The google.rpc.Code of an error reply, by HTTP status; INVALID_ARGUMENT for the others.
_RPC_CODES = {401: _UNAUTHENTICATED, 413: _RESOURCE_EXHAUSTED, 429: _RESOURCE_EXHAUSTED, 503: _UNAVAILABLE}
_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()
# JSON bodies above this size are decoded in a worker thread.
_JSON_INLINE_BYTES = 256 * 1024

Decoder = Callable[[bytes], list[SpanBatch]]
_DECODERS: dict[str, Decoder] = {PROTOBUF: decode_protobuf, JSON: decode_json}


class OTLPHTTPReceiver(HTTPReceiver):
    """`POST /v1/traces` in front of the trace buffer."""

    protocol = PROTOCOL
    label = "OTLP/HTTP"

    def __init__(self, config: OTLPHTTPReceiverConfig, ingest: Ingest, shutdown_grace: float) -> None:
        super().__init__(config.endpoint, config.max_request_bytes, ingest, shutdown_grace, config)
        self.config = config

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self.tracked(self.handle_traces))

    def error_reply(self, rejected: RequestRejected, request: web.Request) -> web.Response:
        return _error_reply(rejected, request.content_type)

    async def handle_traces(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        if self.ingest.pressure.overloaded:
            self.ingest.refuse("overloaded")
            reply = _error_reply(RequestRejected(429, "overloaded", OVERLOADED), content_type)
            reply.headers.update(retry_after_header(self.ingest.pressure.retry_after))
            return reply
        try:
            decoder = _DECODERS.get(content_type)
            if decoder is None:
                raise RequestRejected(
                    415,
                    "unsupported_media_type",
                    f"unsupported content type {content_type!r}; use {PROTOBUF} or {JSON}",
                )
            body = await self.read_body(request)
            try:
                if decoder is decode_json and len(body) > _JSON_INLINE_BYTES:
                    # Pure-Python JSON decoding of a large body would stall every other request;
                    # in a thread the loop keeps its turns.
                    batches = await asyncio.to_thread(decoder, body)
                else:
                    batches = decoder(body)
            except DecodeError as error:
                raise RequestRejected(400, "malformed", str(error)) from None
        except RequestRejected as rejected:
            self.ingest.refuse(rejected.reason)
            return _error_reply(rejected, content_type)
        try:
            # A protobuf body goes to the write-ahead log (if any) as it came.
            result = self.ingest.add(batches, body if decoder is decode_protobuf else None)
            await self.ingest.committed(result)
        except Unavailable as unavailable:
            reply = _error_reply(RequestRejected(503, "wal_unavailable", unavailable.message), content_type)
            reply.headers.update(retry_after_header(unavailable.retry_after))
            return reply
        return _success_reply(result, content_type)


def _success_reply(result: IngestResult, content_type: str) -> web.Response:
    if not result.rejected:
        if content_type == JSON:
            return web.Response(body=b"{}", content_type=JSON)
        return web.Response(body=_EMPTY_RESPONSE, content_type=PROTOBUF)
    response = ExportTraceServiceResponse()
    response.partial_success.rejected_spans = result.rejected
    response.partial_success.error_message = "; ".join(result.errors)
    if content_type == JSON:
        return web.Response(text=json_format.MessageToJson(response, indent=None), content_type=JSON)
    return web.Response(body=response.SerializeToString(), content_type=PROTOBUF)


def _error_reply(rejected: RequestRejected, content_type: str) -> web.Response:
    """An OTLP error reply: a google.rpc.Status in the request's encoding (JSON when unknown)."""
    code = _RPC_CODES.get(rejected.status, _INVALID_ARGUMENT)
    status = Status(code=code, message=rejected.message)
    if content_type == PROTOBUF:
        return web.Response(status=rejected.status, body=status.SerializeToString(), content_type=PROTOBUF)
    return web.Response(
        status=rejected.status,
        text=json_format.MessageToJson(status, indent=None),
        content_type=JSON,
    )
