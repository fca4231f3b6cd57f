"""The OTLP/HTTP exporter: POSTs protobuf batches downstream, with gzip, retries and backoff."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import zlib
from datetime import UTC, datetime

import aiohttp
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.config import OTLPHTTPExporterConfig
from sampler.errors import ExportError
from sampler.exporters.batching import BatchingExporter
from sampler.logthrottle import LogThrottle
from sampler.metrics import Metrics
from sampler.otlp_wire import iter_fields

log = logging.getLogger(__name__)

# The OTLP/HTTP spec's retryable statuses; 429 and 503 may carry Retry-After.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
THROTTLE_STATUSES = frozenset({429, 503})
# Larger bodies are compressed in a worker thread: zlib releases the GIL, so the loop keeps going.
THREAD_COMPRESS_BYTES = 64 * 1024
GZIP_LEVEL = 6
# Backoff jitter as in the OTel Collector: each wait is the interval ±50%.
JITTER = 0.5
_STATUS_MESSAGE = 0x12  # google.rpc.Status.message = 2
_ERROR_SNIPPET = 200


def gzip_compress(body: bytes) -> bytes:
    """A gzip member (mtime 0) of `body`."""
    return zlib.compress(body, level=GZIP_LEVEL, wbits=31)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait per a Retry-After value (delta-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_message(body: bytes, content_type: str) -> str:
    """A short printable piece of an error reply: google.rpc.Status.message, else the text."""
    if content_type.startswith("application/x-protobuf"):
        try:
            for tag, start, end in iter_fields(body):
                if tag == _STATUS_MESSAGE:
                    return body[start:end].decode(errors="replace")[:_ERROR_SNIPPET]
        except (ValueError, IndexError):
            pass
    return body[:_ERROR_SNIPPET].decode(errors="replace")


def rejected_spans(body: bytes, content_type: str) -> tuple[int, str]:
    """`partial_success` (rejected span count, error message) of an ExportTraceServiceResponse."""
    if not body:
        return 0, ""
    if content_type.startswith("application/json"):
        # A server may answer in JSON; the OTLP JSON mapping writes int64 as a string.
        try:
            partial = json.loads(body).get("partialSuccess") or {}
            return int(partial.get("rejectedSpans", 0)), str(partial.get("errorMessage", ""))
        except (ValueError, AttributeError, TypeError):
            return 0, ""
    response = ExportTraceServiceResponse()
    try:
        response.ParseFromString(body)
    except ProtobufDecodeError:
        return 0, ""
    partial = response.partial_success
    return int(partial.rejected_spans), str(partial.error_message)


class _Retryable(Exception):
    """One attempt failed in a way worth retrying; `delay` is the server's Retry-After, if any."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class OTLPHTTPExporter(BatchingExporter):
    """Sends batches as `application/x-protobuf` POSTs over one aiohttp session."""

    def __init__(self, name: str, config: OTLPHTTPExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config.batch, metrics)
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._headers = {**config.headers, "Content-Type": "application/x-protobuf"}
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._partial_log = LogThrottle()

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=self.config.timeout),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, body: bytes, span_count: int) -> int:
        if self.config.compression == "gzip":
            if len(body) > THREAD_COMPRESS_BYTES:
                body = await asyncio.to_thread(gzip_compress, body)
            else:
                body = gzip_compress(body)
        retry = self.config.retry_on_failure
        loop = asyncio.get_running_loop()
        started = loop.time()
        interval = retry.initial_interval
        while True:
            try:
                return await self._attempt(body, span_count)
            except _Retryable as failure:
                if not retry.enabled:
                    raise ExportError(f"{failure} (retries disabled)") from None
                if failure.delay is not None:
                    delay = failure.delay
                else:
                    delay = min(retry.max_interval, interval * random.uniform(1 - JITTER, 1 + JITTER))
                interval = min(retry.max_interval, interval * retry.multiplier)
                elapsed = loop.time() - started
                # max_elapsed_time 0 retries forever, as in the OTel Collector.
                if retry.max_elapsed_time and elapsed + delay > retry.max_elapsed_time:
                    raise ExportError(
                        f"{failure}; giving up after {elapsed:.1f}s "
                        f"(max_elapsed_time {retry.max_elapsed_time:g}s)"
                    ) from None
                log.debug("exporter %s: %s; retrying in %.2fs", self.name, failure, delay)
                self.count_retry()
                await asyncio.sleep(delay)

    async def _attempt(self, body: bytes, span_count: int) -> int:
        if self._session is None:
            raise ExportError("exporter not started")
        try:
            async with self._session.post(self.config.endpoint, data=body) as response:
                reply = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "")
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
            raise _Retryable(f"{type(error).__name__}: {error}") from None
        except TimeoutError:
            raise _Retryable(f"no reply within {self.config.timeout:g}s") from None
        except aiohttp.ClientError as error:
            raise ExportError(f"{type(error).__name__}: {error}") from None
        if 200 <= status < 300:
            rejected, message = rejected_spans(reply, content_type)
            if rejected > 0 and self._partial_log.allow():
                log.warning(
                    "exporter %s: downstream rejected %d of %d spans: %s (%d similar messages suppressed)",
                    self.name,
                    rejected,
                    span_count,
                    message or "no message",
                    self._partial_log.take_suppressed(),
                )
            return rejected
        text = error_message(reply, content_type)
        if status in RETRYABLE_STATUSES:
            delay = parse_retry_after(retry_after) if status in THROTTLE_STATUSES else None
            raise _Retryable(f"HTTP {status}: {text}", delay)
        raise ExportError(f"HTTP {status} (not retryable): {text}")
