"""The OTLP/HTTP exporter: POSTs protobuf batches downstream, with gzip, retries and backoff."""

from __future__ import annotations

import asyncio
import email.utils
import json
import zlib
from datetime import UTC, datetime

import aiohttp
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.config import OTLPHTTPExporterConfig, SendingExporterConfig, ZipkinExporterConfig
from sampler.errors import ExportError
from sampler.exporters.retry import Retryable, RetryingExporter
from sampler.metrics import Metrics
from sampler.otlp_wire import iter_fields
from sampler.tls import load_client_tls

# The OTLP/HTTP spec's retryable statuses; 429 and 503 may carry Retry-After.
RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
THROTTLE_STATUSES = frozenset({429, 503})
# Larger bodies are compressed in a worker thread: zlib releases the GIL, so the loop keeps going.
THREAD_COMPRESS_BYTES = 64 * 1024
GZIP_LEVEL = 6
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
    if value.isascii() and value.isdigit():  # not "²", which isdigit() takes and float() does not
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


def http_session(name: str, config: SendingExporterConfig, headers: dict[str, str]) -> aiohttp.ClientSession:
    """Exporter `name`'s aiohttp session: its headers, request timeout and TLS settings."""
    connector = None
    if config.tls is not None:
        connector = aiohttp.TCPConnector(ssl=load_client_tls(config.tls, f"exporter {name}").context)
    timeout = aiohttp.ClientTimeout(total=config.timeout)
    return aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector)


def server_name(config: SendingExporterConfig) -> str | None:
    """The name the downstream's certificate must carry (and the SNI), when not the endpoint's host."""
    return None if config.tls is None else config.tls.server_name


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


class HTTPPostExporter(RetryingExporter):
    """Sends each batch as one POST to `config.endpoint` over one aiohttp session: what the HTTP
    exporters share. Subclasses set `content_type` and read successful replies in `accepted`."""

    content_type: str

    def __init__(
        self, name: str, config: OTLPHTTPExporterConfig | ZipkinExporterConfig, metrics: Metrics
    ) -> None:
        super().__init__(name, config, metrics)
        self._endpoint = config.endpoint
        self._timeout = config.timeout
        self._http_config: SendingExporterConfig = config
        self._session: aiohttp.ClientSession | None = None
        self._server_name = server_name(config)
        self._headers = {**config.headers, "Content-Type": self.content_type}
        if config.compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"

    async def open(self) -> None:
        self._session = http_session(self.name, self._http_config, self._headers)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def accepted(self, reply: bytes, content_type: str, span_count: int) -> int:
        """How many spans a 2xx reply says were rejected."""
        return 0

    async def attempt(self, payload: bytes, span_count: int) -> int:
        if self._session is None:
            raise ExportError("exporter not started")
        try:
            # Redirects are not followed: aiohttp would send a 301/302/303 on as a GET without the body
            # (and the configured headers to another origin), and its 200 would count as delivery.
            post = self._session.post(
                self._endpoint, data=payload, server_hostname=self._server_name, allow_redirects=False
            )
            async with post as response:
                reply = await response.read()
                status = response.status
                content_type = response.headers.get("Content-Type", "")
                retry_after = response.headers.get("Retry-After")
                location = response.headers.get("Location")
        except aiohttp.ClientError as error:
            raise transport_failure(error) from None
        except TimeoutError:
            raise Retryable(f"no reply within {self._timeout:g}s") from None
        if 200 <= status < 300:
            return self.accepted(reply, content_type, span_count)
        if 300 <= status < 400:
            raise ExportError(
                f"HTTP {status}: redirected to {location or 'no Location'}; redirects are not followed, set "
                "the exporter's endpoint to where it points"
            )
        raise http_failure(status, retry_after, error_message(reply, content_type))


class OTLPHTTPExporter(HTTPPostExporter):
    """Sends batches as `application/x-protobuf` POSTs."""

    content_type = "application/x-protobuf"

    def __init__(self, name: str, config: OTLPHTTPExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config, metrics)
        self.config = config

    async def encode(self, body: bytes) -> bytes:
        if self.config.compression != "gzip":
            return body
        if len(body) > THREAD_COMPRESS_BYTES:
            return await asyncio.to_thread(gzip_compress, body)
        return gzip_compress(body)

    def accepted(self, reply: bytes, content_type: str, span_count: int) -> int:
        rejected, message = rejected_spans(reply, content_type)
        self.log_rejected(rejected, span_count, message)
        return rejected


def http_failure(status: int, retry_after: str | None, text: str) -> Exception:
    """What an error reply means: retry (after the server's Retry-After, if it sent one) or give up."""
    if status not in RETRYABLE_STATUSES:
        return ExportError(f"HTTP {status} (not retryable): {text}")
    delay = parse_retry_after(retry_after) if status in THROTTLE_STATUSES else None
    return Retryable(f"HTTP {status}: {text}", delay)


def transport_failure(error: aiohttp.ClientError) -> Exception:
    """A connection that failed or broke is retried; a failed TLS handshake (an untrusted or mismatched
    certificate, a server not speaking TLS) is a setup problem retries would only hide, as any other
    client error."""
    message = f"{type(error).__name__}: {error}"
    if isinstance(error, aiohttp.ClientSSLError):
        return ExportError(message)
    if isinstance(error, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return Retryable(message)
    return ExportError(message)
