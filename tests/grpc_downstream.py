"""A real OTLP/gRPC backend on loopback for tests: decodes each call, replies as told, records the wire."""

from __future__ import annotations

import asyncio
import gzip
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.conftest import Downstream

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
EXPORT = f"/{SERVICE}/Export"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Call:
    """One Export call the downstream received, whatever it replied."""

    at: float
    metadata: dict[str, str]
    compressed: bool  # the message crossed the wire gzip-compressed
    request: ExportTraceServiceRequest


@dataclass
class Reply:
    """A scripted failure: the status code, and the RetryInfo delay its status details carry, if any."""

    code: grpc.StatusCode
    retry_delay: float | None = None

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        if self.retry_delay is None:
            return ()
        info = RetryInfo()
        info.retry_delay.FromNanoseconds(int(self.retry_delay * 1e9))
        status = Status(code=self.code.value[0], message=self.code.name, details=[AnyMessage()])
        status.details[0].Pack(info)
        return (("grpc-status-details-bin", status.SerializeToString()),)


class GRPCDownstream(Downstream):
    """An OTLP/gRPC backend: `Downstream`'s helpers over the requests it accepted.

    Replies follow `replies` (then OK with `response`); `calls` records every call with its metadata and
    whether its message was compressed. `async with GRPCDownstream() as server` starts and stops it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.replies: list[Reply] = []
        self.response = ExportTraceServiceResponse()
        self.hang = False
        self.release = asyncio.Event()
        self._server: Any = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        # Messages arrive as sent (decompressed here), so a test can tell that gzip was on the wire.
        self._server = grpc.aio.server(
            options=[("grpc.per_message_decompression", 0), ("grpc.max_receive_message_length", 64 << 20)]
        )
        handler = grpc.unary_unary_rpc_method_handler(self._export)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),)
        )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def __aenter__(self) -> GRPCDownstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _export(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        compressed = raw.startswith(GZIP_MAGIC)
        request = ExportTraceServiceRequest.FromString(gzip.decompress(raw) if compressed else raw)
        metadata = {item.key: item.value for item in context.invocation_metadata()}
        self.calls.append(Call(asyncio.get_running_loop().time(), metadata, compressed, request))
        if self.hang:
            await self.release.wait()
        reply = self.replies.pop(0) if self.replies else None
        if reply is not None:
            await context.abort(reply.code, f"scripted {reply.code.name}", reply.trailing_metadata())
        self.requests.append(request)
        return self.response.SerializeToString()
