"""The OTLP/gRPC exporter: protobuf batches as `TraceService/Export` calls, with gzip, retries and backoff."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status

from sampler import __version__
from sampler.config import OTLPGRPCExporterConfig
from sampler.errors import ExportError
from sampler.exporters.otlp_http import rejected_spans
from sampler.exporters.retry import Retryable, RetryingExporter
from sampler.metrics import Metrics
from sampler.tls import load_client_tls

EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# The OTLP/gRPC spec's retryable codes; RESOURCE_EXHAUSTED only when the server says when to retry.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
STATUS_DETAILS_KEY = "grpc-status-details-bin"


def retry_delay(trailing_metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """Seconds to wait per the RetryInfo in a call's google.rpc.Status details; None if there is none."""
    for key, value in trailing_metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = Status.FromString(value)
        except ProtobufDecodeError:
            return None
        for detail in status.details:
            retry_info = RetryInfo()
            if detail.Unpack(retry_info):
                delay: float = retry_info.retry_delay.seconds + retry_info.retry_delay.nanos / 1e9
                return max(0.0, delay)
    return None


def _failure(error: Any) -> Exception:
    """The Retryable or ExportError for a failed call (a grpc.aio.AioRpcError)."""
    code = error.code()
    text = f"gRPC {code.name}: {error.details()}"
    delay = retry_delay(error.trailing_metadata())
    if code in RETRYABLE_CODES or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None):
        return Retryable(text, delay)
    return ExportError(f"{text} (not retryable)")


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class OTLPGRPCExporter(RetryingExporter):
    """Sends batches as unary `Export` calls over one grpc.aio channel."""

    def __init__(self, name: str, config: OTLPGRPCExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config, metrics)
        self.config = config
        self._metadata = tuple(config.headers.items()) or None
        self._channel: grpc.aio.Channel | None = None
        self._export: grpc.aio.UnaryUnaryMultiCallable | None = None

    async def open(self) -> None:
        retry = self.config.retry_on_failure
        options = [
            ("grpc.primary_user_agent", f"tailgate/{__version__}"),
            # grpc's own reconnect backoff (1 s, growing to 120 s) would keep the channel closed long after
            # the downstream is back, failing every retry in between at once: follow retry_on_failure.
            ("grpc.initial_reconnect_backoff_ms", _milliseconds(retry.initial_interval)),
            ("grpc.max_reconnect_backoff_ms", _milliseconds(retry.max_interval)),
        ]
        compression = grpc.Compression.Gzip if self.config.compression == "gzip" else None
        if self.config.tls is None:
            self._channel = grpc.aio.insecure_channel(
                self.config.endpoint, options=options, compression=compression
            )
        else:
            tls = load_client_tls(self.config.tls, f"exporter {self.name}")
            self._channel = grpc.aio.secure_channel(
                self.config.endpoint,
                tls.grpc_credentials(),
                options=[*options, *tls.grpc_options()],
                compression=compression,
            )
        # No serializers: the batch is already an encoded ExportTraceServiceRequest.
        self._export = self._channel.unary_unary(EXPORT_METHOD)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._export = None

    async def attempt(self, payload: bytes, span_count: int) -> int:
        if self._export is None:
            raise ExportError("exporter not started")
        try:
            reply = await self._export(payload, timeout=self.config.timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise _failure(error) from None
        rejected, message = rejected_spans(reply, "application/x-protobuf")
        self.log_rejected(rejected, span_count, message)
        return rejected
