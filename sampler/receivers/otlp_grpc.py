"""OTLP/gRPC trace receiver: `TraceService/Export` on a grpc.aio server sharing the gateway's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

import grpc
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.duration_pb2 import Duration
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.auth import Authenticator
from sampler.buffer import IngestResult
from sampler.config import OTLPGRPCReceiverConfig
from sampler.errors import DecodeError
from sampler.receivers.common import OVERLOADED, Ingest, Unavailable
from sampler.receivers.otlp_decode import decode_protobuf
from sampler.tls import load_server_tls

log = logging.getLogger(__name__)

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
PROTOCOL = "otlp_grpc"
_OWNER = "OTLP/gRPC receiver"  # for logs and errors
# The wait suggested to calls refused at shutdown; behind a load balancer the retry reaches another instance.
SHUTDOWN_RETRY_DELAY = 1.0
_SHUTTING_DOWN = "tailgate is shutting down; retry later or elsewhere"
_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


def retry_later(code: grpc.StatusCode, message: str, delay: float) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata telling an OTLP client to retry after `delay` seconds.

    The OTLP spec reads RetryInfo from the google.rpc.Status details (`grpc-status-details-bin`); the OTel
    Python SDK reads a bare RetryInfo under `google.rpc.retryinfo-bin`, so both are sent.
    """
    retry_delay = Duration()
    retry_delay.FromNanoseconds(round(delay * 1e9))
    retry_info = RetryInfo(retry_delay=retry_delay)
    detail = AnyMessage()
    detail.Pack(retry_info)
    status = Status(code=code.value[0], message=message, details=[detail])
    return (
        ("grpc-status-details-bin", status.SerializeToString()),
        ("google.rpc.retryinfo-bin", retry_info.SerializeToString()),
    )


_SHUTTING_DOWN_TRAILERS = retry_later(grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN, SHUTDOWN_RETRY_DELAY)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers UNAUTHENTICATED to calls without valid credentials in their metadata, before their handler
    runs or their message is read."""

    def __init__(self, authenticator: Authenticator, ingest: Ingest) -> None:
        self.authenticator = authenticator
        self.ingest = ingest

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        metadata = dict(handler_call_details.invocation_metadata or ())
        reason = self.authenticator.refusal(metadata.get)
        if reason is None:
            return await continuation(handler_call_details)
        return grpc.stream_unary_rpc_method_handler(functools.partial(self._refuse, reason))

    async def _refuse(self, reason: str, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """A call's handler that reads nothing and ends it with UNAUTHENTICATED."""
        self.ingest.refuse("unauthenticated")
        self.authenticator.log_refusal(context.peer(), reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"unauthenticated: {reason}")


class OTLPGRPCReceiver:
    """`TraceService/Export` in front of the trace buffer."""

    protocol = PROTOCOL

    reuse_port = False

    def __init__(self, config: OTLPGRPCReceiverConfig, ingest: Ingest, shutdown_grace: float) -> None:
        self.config = config
        self.ingest = ingest
        self.shutdown_grace = shutdown_grace
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopping = False
        self._in_flight = 0
        self._idle = asyncio.Event()

    async def start(self) -> None:
        config = self.config
        tls = None if config.tls is None else load_server_tls(config.tls, _OWNER)
        auth = (
            None if config.auth is None else AuthInterceptor(Authenticator(config.auth, _OWNER), self.ingest)
        )
        server = grpc.aio.server(
            interceptors=None if auth is None else [auth],
            options=[
                # grpc checks this limit after decompression too, before the message reaches the handler.
                ("grpc.max_receive_message_length", self.config.max_request_bytes),
                # A port another process listens on is a start error, not a silent share of its traffic
                # (unless it is another worker of this gateway).
                ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ],
        )
        # Export is unary, but served as request-streaming (one message on the wire either way): the handler
        # then runs from the call's arrival instead of after its message, so shutdown can tell the calls in
        # progress from those that arrive after it began.
        export = grpc.stream_unary_rpc_method_handler(self._export)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": export}),))
        try:
            if tls is None:
                port = server.add_insecure_port(config.endpoint)
            else:
                port = server.add_secure_port(config.endpoint, tls.grpc_credentials())
        except RuntimeError as error:
            await server.stop(None)
            raise OSError(
                f"OTLP/gRPC receiver cannot listen on {self.config.endpoint} (address in use or unavailable)"
            ) from error
        await server.start()
        self._server = server
        self._stopping = False
        self.port = port
        host = self.config.endpoint.rpartition(":")[0]
        mode = "plaintext" if tls is None else tls.mode
        log.info("OTLP/gRPC receiver listening on %s:%s (%s)", host, port, mode)

    async def stop(self) -> None:
        """Refuse new calls; calls in progress get `shutdown_grace` seconds to complete, then grpc closes."""
        server = self._server
        if server is None:
            return
        self._stopping = True
        deadline = asyncio.get_running_loop().time() + self.shutdown_grace
        if self._in_flight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._idle.wait()
        # What is still running when the grace is over, grpc cancels.
        await server.stop(max(0.0, deadline - asyncio.get_running_loop().time()))
        self._server = None

    async def _export(self, requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        if self._stopping:
            self.ingest.refuse("shutting_down")
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, _SHUTTING_DOWN, trailing_metadata=_SHUTTING_DOWN_TRAILERS
            )
        if self.ingest.pressure.overloaded:
            # Refused before its message is read; the OTLP spec makes RESOURCE_EXHAUSTED retryable only
            # with RetryInfo.
            self.ingest.refuse("overloaded")
            exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = retry_later(exhausted, OVERLOADED, self.ingest.pressure.retry_after)
            await context.abort(exhausted, OVERLOADED, trailing_metadata=trailers)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._ingest_request(context)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _ingest_request(self, context: grpc.aio.ServicerContext) -> bytes:
        """Read the call's one message, buffer its spans; the serialized ExportTraceServiceResponse."""
        await self.ingest.admit()
        body = await context.read()
        if body is grpc.aio.EOF:
            # grpc has already answered a message over max_request_bytes (RESOURCE_EXHAUSTED); this status
            # reaches only a client that sent no message at all.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no ExportTraceServiceRequest sent")
        try:
            batches = decode_protobuf(body)
        except DecodeError as error:
            self.ingest.refuse("malformed")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        try:
            result = self.ingest.add(batches, body)
            await self.ingest.committed(result)
        except Unavailable as unavailable:
            unavailable_code = grpc.StatusCode.UNAVAILABLE
            trailers = retry_later(unavailable_code, unavailable.message, unavailable.retry_after)
            await context.abort(unavailable_code, unavailable.message, trailing_metadata=trailers)
        return _reply(result)


def _reply(result: IngestResult) -> bytes:
    if not result.rejected:
        return _EMPTY_RESPONSE
    response = ExportTraceServiceResponse()
    response.partial_success.rejected_spans = result.rejected
    response.partial_success.error_message = "; ".join(result.errors)
    return response.SerializeToString()
