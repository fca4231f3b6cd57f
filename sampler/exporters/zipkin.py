"""The Zipkin exporter: POSTs kept traces to a Zipkin v2 server as JSON, with gzip, retries and backoff."""

from __future__ import annotations

import asyncio

from sampler.config import ZipkinExporterConfig
from sampler.exporters.otlp_http import THREAD_COMPRESS_BYTES, HTTPPostExporter, gzip_compress
from sampler.metrics import Metrics
from sampler.zipkin.from_otlp import to_zipkin_json


class ZipkinExporter(HTTPPostExporter):
    """Sends each batch as one `application/json` POST of Zipkin v2 spans; Zipkin accepts or refuses a
    request whole."""

    content_type = "application/json"

    def __init__(self, name: str, config: ZipkinExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config, metrics)
        self.config = config

    async def encode(self, body: bytes) -> bytes:
        # Mapping to JSON is pure Python: a large batch is mapped in a worker thread.
        if len(body) > THREAD_COMPRESS_BYTES:
            return await asyncio.to_thread(self.zipkin_body, body)
        return self.zipkin_body(body)

    def zipkin_body(self, body: bytes) -> bytes:
        """An ExportTraceServiceRequest as the request body: Zipkin JSON v2, gzipped if configured."""
        payload = to_zipkin_json(body, self.config.default_service_name)
        return gzip_compress(payload) if self.config.compression == "gzip" else payload
