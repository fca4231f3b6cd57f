"""The file exporter: OTLP JSON lines on disk that decode back into the spans sent."""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import signal
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.config import BatchConfig, FileExporterConfig
from sampler.errors import ExportError
from sampler.exporters.file import FileExporter
from sampler.metrics import Metrics

from .helpers import eventually, make_group, make_scope, make_trace, sample

NAME = "file/archive"
SERVICE = make_scope("checkout")
HEX_ID = re.compile(r"^[0-9a-f]+$")


def file_exporter(path: Path, metrics: Metrics, **batch: Any) -> FileExporter:
    options = {"send_batch_size": 1000, "timeout": 10, **batch}
    config = FileExporterConfig(path=str(path), batch=BatchConfig(**options))
    return FileExporter(NAME, config, metrics)


def hex_to_base64(fields: dict[str, Any]) -> None:
    for key in ("traceId", "spanId", "parentSpanId"):
        if key in fields:
            assert HEX_ID.match(fields[key]), fields[key]
            fields[key] = base64.b64encode(bytes.fromhex(fields[key])).decode()


def parse_line(line: str) -> ExportTraceServiceRequest:
    """Decode one OTLP JSON line with protobuf's parser, after turning hex ids back into base64."""
    document = json.loads(line)
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                hex_to_base64(span)
                for link in span.get("links", ()):
                    hex_to_base64(link)
    return json_format.ParseDict(document, ExportTraceServiceRequest())


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    return [
        span
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


async def test_writes_one_json_line_per_batch(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "nested" / "dir" / "spans.jsonl"
    exporter = file_exporter(path, metrics, send_batch_size=4)
    await exporter.start()
    first = make_trace(1, 4)
    second = make_trace(2, 3)
    exporter.export([make_group(SERVICE, first)], 4)  # full: sealed at once
    exporter.export([make_group(SERVICE, second)], 3)  # flushed by shutdown
    await exporter.shutdown(1)

    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert [spans_of(parse_line(line)) for line in lines] == [first, second]
    assert sample(metrics, "tailgate_exporter_sent_spans_total", NAME) == 7


async def test_ids_are_lower_case_hex(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = file_exporter(path, metrics)
    await exporter.start()
    trace = make_trace(7, 2)
    exporter.export([make_group(SERVICE, trace)], 2)
    await exporter.shutdown(1)

    document = json.loads(path.read_text())
    resource_spans = document["resourceSpans"][0]
    assert resource_spans["resource"]["attributes"][0] == {
        "key": "service.name",
        "value": {"stringValue": "checkout"},
    }
    root, child = resource_spans["scopeSpans"][0]["spans"]
    assert root["traceId"] == trace[0].trace_id.hex() == "fe" + "00" * 14 + "07"
    assert root["spanId"] == trace[0].span_id.hex()
    assert "parentSpanId" not in root
    assert child["parentSpanId"] == root["spanId"]
    assert child["links"] == [{"traceId": "ab" * 16, "spanId": "cd" * 8}]
    assert child["kind"] == Span.SPAN_KIND_SERVER  # enums as integers
    assert child["startTimeUnixNano"] == str(trace[1].start_time_unix_nano)


async def test_appends_to_an_existing_file(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "spans.jsonl"
    for number in (1, 2):
        exporter = file_exporter(path, Metrics())
        await exporter.start()
        trace = make_trace(number, 1)
        exporter.export([make_group(SERVICE, trace)], 1)
        await exporter.shutdown(1)
    lines = path.read_text().splitlines()
    assert [spans_of(parse_line(line))[0].name for line in lines] == ["op-1-0", "op-2-0"]


async def test_batches_written_in_order(tmp_path: Path, metrics: Metrics) -> None:
    path = tmp_path / "spans.jsonl"
    exporter = file_exporter(path, metrics, send_batch_size=1, num_consumers=4)
    await exporter.start()
    traces = [make_trace(number, 1) for number in range(1, 21)]
    for trace in traces:
        exporter.export([make_group(SERVICE, trace)], 1)
    await exporter.shutdown(1)
    lines = path.read_text().splitlines()
    assert [spans_of(parse_line(line)) for line in lines] == traces


async def test_unwritable_path_fails_start(tmp_path: Path, metrics: Metrics) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    exporter = file_exporter(blocker / "spans.jsonl", metrics)
    with pytest.raises(ExportError, match="cannot open"):
        await exporter.start()


def spans_in(path: Path) -> int:
    return sum(
        len(scope_spans["spans"])
        for line in path.read_text().splitlines()
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
    )


async def test_a_batch_the_disk_had_no_room_for_is_not_written_later(
    tmp_path: Path, metrics: Metrics
) -> None:
    """The disk is full for one batch (the file's descriptor on /dev/full), then has room again: the
    first batch counts as failed and stays out of the file (buffered, it was written with the next)."""
    path = tmp_path / "traces.jsonl"
    exporter = file_exporter(path, metrics, send_batch_size=2, timeout=0.02)
    await exporter.start()
    assert exporter._file is not None
    fd = exporter._file.fileno()
    saved = os.dup(fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, fd)
    os.close(full)
    exporter.export([make_group(SERVICE, make_trace(1, 2))], 2)
    await eventually(lambda: sample(metrics, "tailgate_exporter_failed_spans_total", NAME) == 2)
    os.dup2(saved, fd)
    os.close(saved)
    exporter.export([make_group(SERVICE, make_trace(2, 2))], 2)
    await eventually(lambda: sample(metrics, "tailgate_exporter_sent_spans_total", NAME) == 2)
    await exporter.shutdown(1)
    assert spans_in(path) == 2


async def test_a_full_disk_at_shutdown_does_not_stop_the_shutdown(metrics: Metrics) -> None:
    exporter = FileExporter(
        NAME,
        FileExporterConfig(path="/dev/full", batch=BatchConfig(send_batch_size=2, timeout=0.02)),
        metrics,
    )
    await exporter.start()
    exporter.export([make_group(SERVICE, make_trace(1, 2))], 2)
    await eventually(lambda: sample(metrics, "tailgate_exporter_failed_spans_total", NAME) == 2)
    await exporter.shutdown(1)  # closing the file raised OSError out of the gateway's stop


async def test_a_line_the_disk_took_part_of_is_taken_back_out(tmp_path: Path, metrics: Metrics) -> None:
    """The disk has room for part of a line only: that part is truncated away, or the next batch (counted
    sent) was appended to it and neither line read back as JSON (nor could `simulate` read a capture)."""
    path = tmp_path / "traces.jsonl"
    exporter = file_exporter(path, metrics, send_batch_size=2, timeout=0.02)
    await exporter.start()
    exporter.export([make_group(SERVICE, make_trace(1, 2))], 2)
    await eventually(lambda: sample(metrics, "tailgate_exporter_sent_spans_total", NAME) == 2)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 100, hard))  # room for 100 bytes
    try:
        exporter.export([make_group(SERVICE, make_trace(2, 2, padding=1000))], 2)
        await eventually(lambda: sample(metrics, "tailgate_exporter_failed_spans_total", NAME) == 2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    exporter.export([make_group(SERVICE, make_trace(3, 2))], 2)
    await eventually(lambda: sample(metrics, "tailgate_exporter_sent_spans_total", NAME) == 4)
    await exporter.shutdown(1)
    assert spans_in(path) == 4  # two whole lines, each JSON
