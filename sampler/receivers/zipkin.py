"""Zipkin v2 receiver: `POST /api/v2/spans` in JSON or proto3, optionally gzip-compressed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import hdrs, web

from sampler.buffer import IngestResult, SpanBatch
from sampler.config import ZipkinReceiverConfig
from sampler.errors import DecodeError
from sampler.receivers.common import OVERLOADED, Ingest, Unavailable, retry_after_header
from sampler.receivers.http_server import HTTPReceiver, RequestRejected
from sampler.zipkin.spans import ZipkinSpan, parse_json, parse_proto3
from sampler.zipkin.to_otlp import to_batches

JSON = "application/json"
PROTOBUF = "application/x-protobuf"
PROTOCOL = "zipkin"
# Bodies above this size are decoded in a worker thread.
_INLINE_BYTES = 256 * 1024

Parser = Callable[[bytes], list[ZipkinSpan]]
_PARSERS: dict[str, Parser] = {JSON: parse_json, PROTOBUF: parse_proto3}


def decode(body: bytes, parse: Parser) -> list[SpanBatch]:
    """A Zipkin body as span batches for the buffer."""
    return to_batches(parse(body))


class ZipkinReceiver(HTTPReceiver):
    """`POST /api/v2/spans` in front of the trace buffer; replies 202 Accepted as Zipkin does."""

    protocol = PROTOCOL
    label = "Zipkin"

    def __init__(self, config: ZipkinReceiverConfig, ingest: Ingest, shutdown_grace: float) -> None:
        super().__init__(
            endpoint=config.endpoint,
            max_request_bytes=config.max_request_bytes,
            ingest=ingest,
            shutdown_grace=shutdown_grace,
            security=config,
        )

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v2/spans", self.tracked(self.handle_spans))

    async def handle_spans(self, request: web.Request) -> web.Response:
        if self.ingest.pressure.overloaded:
            self.ingest.refuse("overloaded")
            retry_after = retry_after_header(self.ingest.pressure.retry_after)
            return web.Response(status=429, text=OVERLOADED, headers=retry_after)
        try:
            batches = await self.read_batches(request)
        except RequestRejected as rejected:
            self.ingest.refuse(rejected.reason)
            return web.Response(status=rejected.status, text=rejected.message)
        try:
            result = self.ingest.add(batches)
            await self.ingest.committed(result)
        except Unavailable as unavailable:
            retry_after = retry_after_header(unavailable.retry_after)
            return web.Response(status=503, text=unavailable.message, headers=retry_after)
        return _accepted(result)

    async def read_batches(self, request: web.Request) -> list[SpanBatch]:
        """The request's spans as batches; RequestRejected when the body cannot be read."""
        parse = _parser(request)
        body = await self.read_body(request)
        try:
            if len(body) <= _INLINE_BYTES:
                return decode(body, parse)
            # Mapping a large body in pure Python would stall every other request; in a thread the
            # loop keeps its turns.
            return await asyncio.to_thread(decode, body, parse)
        except DecodeError as error:
            raise RequestRejected(400, "malformed", str(error)) from None


def _parser(request: web.Request) -> Parser:
    # Zipkin clients that send JSON do not always say so.
    if hdrs.CONTENT_TYPE not in request.headers:
        return parse_json
    parse = _PARSERS.get(request.content_type)
    if parse is None:
        raise RequestRejected(
            415,
            "unsupported_media_type",
            f"unsupported content type {request.content_type!r}; use {JSON} or {PROTOBUF}",
        )
    return parse


def _accepted(result: IngestResult) -> web.Response:
    if not result.rejected:
        return web.Response(status=202)
    # Zipkin has no partial success reply; the count and reasons are for whoever reads the body.
    return web.Response(status=202, text=f"{result.rejected} spans rejected: {'; '.join(result.errors)}")
