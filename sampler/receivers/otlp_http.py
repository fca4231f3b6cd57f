"""OTLP/HTTP trace receiver: `POST /v1/traces` in protobuf or JSON, optionally gzip-compressed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Callable

from aiohttp import web
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.buffer import IngestResult, SpanBatch, TraceBuffer
from sampler.config import OTLPHTTPReceiverConfig
from sampler.errors import DecodeError, TailgateError
from sampler.metrics import Metrics
from sampler.receivers.otlp_decode import decode_json, decode_protobuf

log = logging.getLogger(__name__)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
PROTOCOL = "otlp_http"
# google.rpc.Code values used in error replies.
_INVALID_ARGUMENT = 3
_RESOURCE_EXHAUSTED = 8
_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()
# JSON bodies above this size are decoded in a worker thread.
_JSON_INLINE_BYTES = 256 * 1024

Decoder = Callable[[bytes], list[SpanBatch]]
_DECODERS: dict[str, Decoder] = {PROTOBUF: decode_protobuf, JSON: decode_json}


class RequestRejected(TailgateError):
    """A request answered with an error status before any span was buffered."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message


class OTLPHTTPReceiver:
    """The aiohttp server in front of the trace buffer."""

    def __init__(
        self,
        config: OTLPHTTPReceiverConfig,
        buffer: TraceBuffer,
        metrics: Metrics,
        count_late: Callable[[IngestResult], None],
        shutdown_grace: float,
    ) -> None:
        self.config = config
        self.buffer = buffer
        self.metrics = metrics
        self.count_late = count_late
        self.shutdown_grace = shutdown_grace
        self._accepted = metrics.received_spans.labels(PROTOCOL, "accepted")
        self._rejected = metrics.received_spans.labels(PROTOCOL, "rejected")
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        # Requests being handled, so that shutdown can let them finish.
        self._in_flight = 0
        self._idle = asyncio.Event()

    def make_app(self) -> web.Application:
        # client_max_size bounds the body as sent; the decompressed size is checked separately.
        app = web.Application(client_max_size=self.config.max_request_bytes)
        app.router.add_post("/v1/traces", self.handle_traces)
        return app

    async def start(self) -> None:
        host, _, port = self.config.endpoint.rpartition(":")
        # Decompression is done here, bounded, instead of by aiohttp's unbounded reader.
        self._runner = web.AppRunner(
            self.make_app(),
            auto_decompress=False,
            access_log=None,
            shutdown_timeout=self.shutdown_grace,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        self.port = _bound_port(self._runner)
        log.info("OTLP/HTTP receiver listening on %s:%s", host, self.port)

    async def stop(self) -> None:
        """Stop accepting; requests in progress get `shutdown_grace` seconds to complete."""
        if self._runner is None:
            return
        # Close the listening sockets first: aiohttp's cleanup closes connections straight away, which
        # would cut off a request whose body is still arriving.
        for site in list(self._runner.sites):
            await site.stop()
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.shutdown_grace):
                    await self._idle.wait()
        await self._runner.cleanup()
        self._runner = None

    async def handle_traces(self, request: web.Request) -> web.Response:
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._handle_traces(request)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _handle_traces(self, request: web.Request) -> web.Response:
        content_type = request.content_type
        try:
            decoder = _DECODERS.get(content_type)
            if decoder is None:
                raise RequestRejected(
                    415,
                    "unsupported_media_type",
                    f"unsupported content type {content_type!r}; use {PROTOBUF} or {JSON}",
                )
            body = await self._read_body(request)
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
            self.metrics.rejected_requests.labels(PROTOCOL, rejected.reason).inc()
            return _error_reply(rejected, content_type)
        result = self.buffer.add_spans(batches)
        self._count(result)
        return _success_reply(result, content_type)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_request_bytes
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestRejected(
                413, "too_large", f"request body exceeds max_request_bytes ({limit})"
            ) from None
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return body
        if encoding not in ("gzip", "deflate"):
            raise RequestRejected(415, "unsupported_encoding", f"unsupported Content-Encoding {encoding!r}")
        return _decompress(body, encoding, limit)

    def _count(self, result: IngestResult) -> None:
        if result.accepted:
            self._accepted.inc(result.accepted)
        if result.rejected:
            self._rejected.inc(result.rejected)
        if result.late_kept or result.late_dropped:
            self.count_late(result)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a gzip (every member, as RFC 1952 allows several) or zlib body, at most `limit` bytes.

    max_length makes a decompression bomb stop at the limit instead of filling memory.
    """
    wbits = 31 if encoding == "gzip" else zlib.MAX_WBITS
    parts: list[bytes] = []
    size = 0
    data = body
    while True:
        decompressor = zlib.decompressobj(wbits)
        try:
            part = decompressor.decompress(data, limit + 1 - size)
        except zlib.error as error:
            raise RequestRejected(400, "malformed", f"invalid {encoding} body: {error}") from None
        size += len(part)
        if size > limit:
            raise RequestRejected(413, "too_large", f"decompressed body exceeds max_request_bytes ({limit})")
        if not decompressor.eof:
            raise RequestRejected(400, "malformed", f"truncated {encoding} body")
        parts.append(part)
        data = decompressor.unused_data
        if not data:
            return b"".join(parts)
        if encoding != "gzip" or not data.startswith(b"\x1f\x8b"):
            raise RequestRejected(400, "malformed", f"unexpected data after the {encoding} stream")


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
    code = _RESOURCE_EXHAUSTED if rejected.status == 413 else _INVALID_ARGUMENT
    status = Status(code=code, message=rejected.message)
    if content_type == PROTOBUF:
        return web.Response(status=rejected.status, body=status.SerializeToString(), content_type=PROTOBUF)
    return web.Response(
        status=rejected.status,
        text=json_format.MessageToJson(status, indent=None),
        content_type=JSON,
    )


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("receiver is not bound")
