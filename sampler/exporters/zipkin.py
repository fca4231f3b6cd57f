"""The Zipkin exporter: POSTs kept traces to a Zipkin v2 server as JSON, with gzip, retries and backoff."""

from __future__ import annotations

import asyncio

import aiohttp

from sampler.config import ZipkinExporterConfig
from sampler.errors import ExportError
from sampler.exporters.otlp_http import (
    THREAD_COMPRESS_BYTES,
    error_message,
    gzip_compress,
    http_failure,
    http_session,
    server_name,
    transport_failure,
)
from sampler.exporters.retry import Retryable, RetryingExporter
from sampler.metrics import Metrics
from sampler.zipkin.from_otlp import to_zipkin_json


class ZipkinExporter(RetryingExporter):
    """Sends each batch as one `application/json` POST of Zipkin v2 spans over one aiohttp session."""

    def __init__(self, name: str, config: ZipkinExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config, metrics)
        self.config = config
        self._session: aiohttp.ClientSession | None = None
        self._server_name = server_name(config)

    async def open(self) -> None:
        headers = {**self.config.headers, "Content-Type": "application/json"}
        if self.config.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        self._session = http_session(self.name, self.config, headers)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def encode(self, body: bytes) -> bytes:
        # Mapping to JSON is pure Python: a large batch is mapped in a worker thread.
        if len(body) > THREAD_COMPRESS_BYTES:
            return await asyncio.to_thread(self.zipkin_body, body)
        return self.zipkin_body(body)

    def zipkin_body(self, body: bytes) -> bytes:
        """An ExportTraceServiceRequest as the request body: Zipkin JSON v2, gzipped if configured."""
        payload = to_zipkin_json(body, self.config.default_service_name)
        return gzip_compress(payload) if self.config.compression == "gzip" else payload

    async def attempt(self, payload: bytes, span_count: int) -> int:
        if self._session is None:
            raise ExportError("exporter not started")
        try:
            post = self._session.post(self.config.endpoint, data=payload, server_hostname=self._server_name)
            async with post as response:
                if 200 <= response.status < 300:
                    # Zipkin accepts or refuses a request whole.
                    return 0
                text = error_message(await response.read(), response.content_type)
                raise http_failure(response.status, response.headers.get("Retry-After"), text)
        except aiohttp.ClientError as error:
            raise transport_failure(error) from None
        except TimeoutError:
            raise Retryable(f"no reply within {self.config.timeout:g}s") from None
