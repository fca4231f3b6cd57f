"""The file exporter: appends each batch to a file as one line of OTLP JSON."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
from pathlib import Path
from typing import IO, Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sampler.config import FileExporterConfig
from sampler.errors import ExportError
from sampler.exporters.batching import BatchingExporter
from sampler.metrics import Metrics

log = logging.getLogger(__name__)

# OTLP JSON writes these bytes fields as hex where protobuf's JSON mapping writes base64.
_ID_KEYS = ("traceId", "spanId", "parentSpanId")


def _ids_to_hex(fields: dict[str, Any]) -> None:
    for key in _ID_KEYS:
        value = fields.get(key)
        if value:
            fields[key] = base64.b64decode(value).hex()


def request_to_json(body: bytes) -> bytes:
    """One OTLP JSON line (without the newline) for a serialized ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except ProtobufDecodeError as error:
        raise ExportError(f"cannot decode batch: {error}") from None
    document = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in document.get("resourceSpans", ()):
        for scope_spans in resource_spans.get("scopeSpans", ()):
            for span in scope_spans.get("spans", ()):
                _ids_to_hex(span)
                for link in span.get("links", ()):
                    _ids_to_hex(link)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class FileExporter(BatchingExporter):
    """Writes batches to `path`, one line each, in the order they were sealed.

    One sender only, whatever `num_consumers` says: lines must land in order, and JSON encoding
    holds the GIL, so more writers would not be faster.
    """

    def __init__(self, name: str, config: FileExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config.batch, metrics, num_consumers=1)
        self.config = config
        self._file: IO[bytes] | None = None

    async def open(self) -> None:
        self._file = await asyncio.to_thread(self._open)

    async def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                await asyncio.to_thread(file.close)
            except OSError as error:  # nothing to flush (unbuffered), but a shutdown must go on
                log.warning("exporter %s: cannot close %s: %s", self.name, self.config.path, error.strerror)

    async def send(self, body: bytes, span_count: int) -> int:
        file = self._file
        if file is None:
            raise ExportError("exporter not started")
        await asyncio.to_thread(self._write, file, body)
        return 0

    def _open(self) -> IO[bytes]:
        path = Path(self.config.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered: a line a failed write did not take is gone with its batch (counted failed), never
            # written later with the next one; and each line is one write, whole among other writers'.
            return path.open("ab", buffering=0)
        except OSError as error:
            raise ExportError(f"exporter {self.name}: cannot open {path}: {error.strerror}") from None

    def _write(self, file: IO[bytes], body: bytes) -> None:
        line = request_to_json(body) + b"\n"
        try:
            written = file.write(line)
        except OSError as error:
            raise ExportError(f"cannot write {self.config.path}: {error.strerror}") from None
        if written != len(line):  # the disk filled up mid-line
            # The torn part is taken back out, or the next line would be appended to it and neither read
            # back. (A FIFO cannot be truncated; nothing is left to take back there.)
            with contextlib.suppress(OSError):
                os.ftruncate(file.fileno(), file.tell() - (written or 0))
            raise ExportError(f"cannot write {self.config.path}: {written} of {len(line)} bytes written")
