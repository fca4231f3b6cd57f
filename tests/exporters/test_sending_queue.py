"""The sending queue: segment files on disk (records, acks, replay, damage, bounds, the lock) and the
exporter's behaviour over it against a real downstream that is down, refusing, or up."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.config import (
    BatchConfig,
    OTLPHTTPExporterConfig,
    RetryConfig,
    SendingQueueConfig,
    parse_config,
)
from sampler.errors import ConfigError, ExportError
from sampler.exporters.otlp_http import OTLPHTTPExporter
from sampler.exporters.queue import HEADER, DiskQueue, Record, encode_record
from sampler.metrics import Metrics
from tests.conftest import free_port

from .helpers import Downstream, Reply, eventually, make_group, make_scope, make_trace, sample

NAME = "otlp_http/backend"
# The exporter's own subdirectory under sending_queue.directory.
SUBDIRECTORY = "otlp_http%2Fbackend"
SENT = "tailgate_exporter_sent_spans_total"
FAILED = "tailgate_exporter_failed_spans_total"
DROPPED = "tailgate_exporter_dropped_spans_total"
QUEUE_BYTES = "tailgate_exporter_queue_bytes"
RECOVERED = "tailgate_exporter_queue_recovered_batches_total"
CORRUPT = "tailgate_exporter_queue_corrupt_records_total"
SERVICE = make_scope("checkout")


def queue_config(directory: Path, **options: Any) -> SendingQueueConfig:
    return SendingQueueConfig(storage="disk", directory=str(directory), **options)


def files(directory: Path, suffix: str) -> list[str]:
    return sorted(path.name for path in directory.glob(f"*{suffix}"))


def segment_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.seg"))


def bodies(count: int, size: int = 150) -> list[bytes]:
    return [bytes([number]) * size for number in range(count)]


async def test_records_read_back_and_a_segment_goes_once_all_its_records_are_acked(tmp_path: Path) -> None:
    # 1600 bytes: segments close at 200 bytes, two 150-byte bodies each.
    queue = DiskQueue(tmp_path, queue_config(tmp_path, max_bytes=1600, fsync="never"))
    await queue.open()
    records = [queue.append(body, 3) for body in bodies(4)]
    assert all(isinstance(record, Record) for record in records)
    stored = [record for record in records if record is not None]
    assert [record.body() for record in stored] == bodies(4)
    assert files(tmp_path, ".seg") == ["000000000000.seg", "000000000001.seg"]
    assert queue.bytes == segment_bytes(tmp_path)
    assert (queue.unacked_records, queue.unacked_spans) == (4, 12)

    assert not queue.ack(stored[0])  # its neighbour is still queued: the segment stays, noting the ack
    assert files(tmp_path, ".ack") == ["000000000000.ack"]
    assert queue.ack(stored[1])
    assert files(tmp_path, ".seg") == ["000000000001.seg"]
    assert files(tmp_path, ".ack") == []
    queue.ack(stored[3])
    queue.ack(stored[2])
    assert files(tmp_path, ".seg") == []
    assert (queue.bytes, queue.unacked_records, queue.unacked_spans) == (0, 0, 0)
    await queue.close()


@pytest.mark.parametrize("fsync", ["always", "batch", "never"])
async def test_a_restart_replays_unacknowledged_records_in_order(tmp_path: Path, fsync: str) -> None:
    config = queue_config(tmp_path, max_bytes=1600, fsync=fsync)
    first = DiskQueue(tmp_path, config)
    await first.open()
    records = [first.append(body, number) for number, body in enumerate(bodies(6))]
    for number in (1, 4):
        record = records[number]
        assert record is not None
        first.ack(record)
    await first.close()

    second = DiskQueue(tmp_path, config)
    recovery = await second.open()
    assert [record.body() for record in recovery.records] == [bodies(6)[n] for n in (0, 2, 3, 5)]
    assert [record.span_count for record in recovery.records] == [0, 2, 3, 5]
    assert recovery.corrupt == 0
    # New records go after the recovered ones, in a segment of their own.
    new = second.append(b"new", 1)
    assert new is not None
    assert new.segment.seq > max(record.segment.seq for record in recovery.records)
    await second.close()


async def test_a_damaged_record_and_a_truncated_tail_are_skipped(tmp_path: Path) -> None:
    config = queue_config(tmp_path, fsync="never")
    first = DiskQueue(tmp_path, config)
    await first.open()
    records = [first.append(body, 1) for body in bodies(4)]
    await first.close()
    assert all(record is not None for record in records)
    damaged, torn = records[1], records[3]
    assert damaged is not None and torn is not None
    segment = tmp_path / "000000000000.seg"
    data = bytearray(segment.read_bytes())
    data[damaged.offset + HEADER.size + 20] ^= 0xFF  # a bit flip in the payload: the CRC fails
    segment.write_bytes(bytes(data[: torn.offset + torn.size // 2]))  # a crash mid-write

    second = DiskQueue(tmp_path, config)
    recovery = await second.open()
    assert [record.body() for record in recovery.records] == [bodies(4)[0], bodies(4)[2]]
    assert recovery.corrupt == 2
    await second.close()


async def test_a_second_queue_on_a_locked_directory_fails_to_open(tmp_path: Path) -> None:
    config = queue_config(tmp_path)
    first = DiskQueue(tmp_path, config)
    await first.open()
    second = DiskQueue(tmp_path, config)
    with pytest.raises(ExportError, match=r"in use by another gateway .* held by pid \d+"):
        await second.open()
    await first.close()
    await second.open()  # the lock goes with the first queue
    await second.close()


def test_disk_storage_without_a_directory_is_a_config_error() -> None:
    exporter = {"endpoint": "http://127.0.0.1:4318/v1/traces", "sending_queue": {"storage": "disk"}}
    with pytest.raises(
        ConfigError, match=r"exporters\.otlp_http/backend\.sending_queue\.directory: required"
    ):
        parse_config({"exporters": {NAME: exporter}})


def disk_exporter(
    url: str, metrics: Metrics, directory: Path, *, batch: dict[str, Any] | None = None, **queue: Any
) -> OTLPHTTPExporter:
    """Batches of one 2-span trace, one sender (so batches arrive in order), retrying until delivered."""
    config = OTLPHTTPExporterConfig(
        endpoint=url,
        batch=BatchConfig(**{"send_batch_size": 2, "timeout": 0.02, "num_consumers": 1, **(batch or {})}),
        retry_on_failure=RetryConfig(initial_interval=0.02, max_interval=0.05, max_elapsed_time=0),
        sending_queue=queue_config(directory, **queue),
    )
    return OTLPHTTPExporter(NAME, config, metrics)


def export_traces(exporter: OTLPHTTPExporter, numbers: range, *, padding: int = 0) -> list[Span]:
    sent: list[Span] = []
    for number in numbers:
        trace = make_trace(number, 2, padding=padding)
        exporter.export([make_group(SERVICE, trace)], len(trace))
        sent.extend(trace)
    return sent


def span_ids(spans: list[Span]) -> list[bytes]:
    return [span.span_id for span in spans]


async def test_shutdown_leaves_batches_on_disk_and_the_next_start_sends_them_first(
    tmp_path: Path,
    make_downstream: Callable[[int], Awaitable[Downstream]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()  # nothing listens yet
    url = f"http://127.0.0.1:{port}/v1/traces"
    before = Metrics()
    exporter = disk_exporter(url, before, tmp_path)
    await exporter.start()
    queued = export_traces(exporter, range(1, 6))
    with caplog.at_level(logging.INFO):
        await exporter.shutdown(0.2)
    assert "5 batches (10 spans) left in" in caplog.text
    assert sample(before, FAILED, NAME) == 0  # not lost: on disk
    assert files(tmp_path / SUBDIRECTORY, ".seg")

    downstream = await make_downstream(port)
    after = Metrics()
    restarted = disk_exporter(url, after, tmp_path)
    later = export_traces(restarted, range(6, 8))  # before start: queued after the recovered batches
    await restarted.start()
    await eventually(lambda: len(downstream.delivered_spans()) == 14)
    assert span_ids(downstream.delivered_spans()) == span_ids(queued + later)
    assert sample(after, RECOVERED, NAME) == 5
    await restarted.shutdown(1)
    assert files(tmp_path / SUBDIRECTORY, ".seg") == []
    assert sample(after, QUEUE_BYTES, NAME) == 0


async def test_a_batch_refused_for_good_is_failed_and_forgotten(
    tmp_path: Path, downstream: Downstream, metrics: Metrics
) -> None:
    downstream.replies = [Reply(400, body=b"bad batch")]
    exporter = disk_exporter(downstream.url, metrics, tmp_path)
    await exporter.start()
    export_traces(exporter, range(1, 2))
    await eventually(lambda: sample(metrics, FAILED, NAME) == 2)
    kept = export_traces(exporter, range(2, 3))
    await eventually(lambda: sample(metrics, SENT, NAME) == 2)
    assert downstream.delivered_spans() == kept
    await exporter.shutdown(1)
    assert files(tmp_path / SUBDIRECTORY, ".seg") == []


@pytest.mark.parametrize("when_full", ["drop", "backpressure"])
async def test_a_full_disk_queue_refuses_batches_and_reports_full_for_backpressure(
    tmp_path: Path,
    make_downstream: Callable[[int], Awaitable[Downstream]],
    metrics: Metrics,
    when_full: str,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/traces"
    # About 1 KB per batch: 8 KB holds 7 of them (one segment each).
    exporter = disk_exporter(url, metrics, tmp_path, max_bytes=8192, when_full=when_full)
    await exporter.start()
    accepted: list[Span] = []
    number = 0
    while not sample(metrics, DROPPED, NAME):
        # A trace fills a batch: it is sealed and stored (or refused) within export().
        number += 1
        trace = export_traces(exporter, range(number, number + 1), padding=400)
        if not sample(metrics, DROPPED, NAME):
            accepted += trace
    assert 0 < sample(metrics, QUEUE_BYTES, NAME) <= 8192
    assert exporter.is_full() is (when_full == "backpressure")
    export_traces(exporter, range(1000, 1001))
    assert sample(metrics, DROPPED, NAME) == 4  # refused at once while full

    downstream = await make_downstream(port)
    await eventually(lambda: len(downstream.delivered_spans()) == len(accepted), within=5)
    assert sorted(span_ids(downstream.delivered_spans())) == sorted(span_ids(accepted))
    assert not exporter.is_full()
    after = export_traces(exporter, range(2000, 2001))
    await exporter.shutdown(1)
    assert downstream.delivered_spans()[-2:] == after


async def test_a_memory_queue_is_full_until_a_batch_leaves(downstream: Downstream, metrics: Metrics) -> None:
    downstream.hang = True
    config = OTLPHTTPExporterConfig(
        endpoint=downstream.url, batch=BatchConfig(send_batch_size=2, timeout=0.02, queue_size=4)
    )
    exporter = OTLPHTTPExporter(NAME, config, metrics)
    await exporter.start()
    export_traces(exporter, range(1, 3))
    assert not exporter.is_full()
    export_traces(exporter, range(3, 4))
    assert exporter.is_full()
    downstream.release.set()
    await eventually(lambda: not exporter.is_full())
    await exporter.shutdown(1)


async def test_a_disk_that_cannot_be_written_drops_the_batch_and_the_next_goes_to_a_new_segment(
    tmp_path: Path, downstream: Downstream, metrics: Metrics
) -> None:
    """ENOSPC on the segment being written (its descriptor pointed at /dev/full): that batch is counted as
    dropped and logged; the torn segment is closed and later batches are stored and delivered."""
    exporter = disk_exporter(downstream.url, metrics, tmp_path, batch={"timeout": 10.0})
    await exporter.start()
    first = export_traces(exporter, range(1, 2))
    await eventually(lambda: len(downstream.delivered_spans()) == 2)
    store = exporter._store
    assert store is not None
    export_traces(exporter, range(2, 3))  # on a segment that stays open
    active = store._active
    assert active is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, active.fd)
    os.close(full)
    export_traces(exporter, range(3, 4))
    assert sample(metrics, DROPPED, NAME) == 2
    later = export_traces(exporter, range(4, 5))
    await eventually(lambda: len(downstream.delivered_spans()) == 6)
    await exporter.shutdown(1)
    assert span_ids(downstream.delivered_spans()) == span_ids(first + make_trace(2, 2) + later)


async def test_a_record_forged_in_span_bytes_is_not_recovered_after_a_torn_tail(
    tmp_path: Path, downstream: Downstream
) -> None:
    """A client puts the bytes of a whole queue record in a span attribute, and the batch holding that
    span is torn by a crash mid-write. Resuming at the next record marker found the forged record sound
    inside the torn one and sent it at start: spans no policy kept and no check looked at."""
    forged_request = ExportTraceServiceRequest()
    forged_span = forged_request.resource_spans.add().scope_spans.add().spans.add()
    forged_span.trace_id = b"\x66" * 16
    forged_span.span_id = b"\x66" * 8
    forged_span.name = "forged"
    header, payload = encode_record(forged_request.SerializeToString(), 1)
    forged = header + payload
    spans = make_trace(1, 2)
    spans[1].attributes.append(KeyValue(key="note", value=AnyValue(bytes_value=forged + b"\x00" * 4096)))
    down = f"http://127.0.0.1:{free_port()}/v1/traces"  # nothing listens: the batch stays on disk
    first = disk_exporter(down, Metrics(), tmp_path, fsync="never")
    await first.start()
    first.export([make_group(SERVICE, spans)], 2)
    await first.shutdown(0.2)
    (segment,) = (tmp_path / SUBDIRECTORY).glob("*.seg")
    data = segment.read_bytes()
    where = data.find(forged)
    assert where > 0
    segment.write_bytes(data[: where + len(forged) + 100])  # torn after the forged bytes

    metrics = Metrics()
    restarted = disk_exporter(downstream.url, metrics, tmp_path, fsync="never")
    await restarted.start()
    assert sample(metrics, RECOVERED, NAME) == 0
    assert sample(metrics, CORRUPT, NAME) == 1
    await restarted.shutdown(1)
    assert downstream.delivered_spans() == []
