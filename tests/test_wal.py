"""Durable ingest (`durability: wal`): what was acknowledged survives kill -9; the log is checkpointed,
compacted and emptied; a log that cannot be written refuses requests instead of acknowledging them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import resource
import signal
import threading
import zlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.trace import StatusCode

import sampler.wal
from sampler.app import Gateway
from sampler.buffer import DecisionCache, Kept, TraceBuffer
from sampler.cluster.ring import Ring
from sampler.config import TailSamplingConfig, WALConfig, parse_config
from sampler.metrics import Metrics
from sampler.receivers.common import Ingest
from sampler.receivers.otlp_decode import decode_protobuf
from sampler.wal import (
    _CHECKED,
    HEADER,
    MAGIC,
    REQUEST,
    WALError,
    WriteAheadLog,
    decode_decisions,
    encode_decisions,
)
from tests.conftest import Downstream as ConftestDownstream
from tests.conftest import GatewayFactory, free_port, gateway_config, metric, receiver_url, wait_for
from tests.exporters.helpers import Downstream
from tests.grpc_downstream import GRPCDownstream
from tests.otlp_data import ERRORS_ONLY, PROTOBUF, make_request, post, send
from tests.test_cli import wait_ready
from tests.test_mixed_protocols import all_protocols_config, send_trace_over_three_protocols
from tests.test_outage import admin_port, run_gateway

# Acknowledged spans: (trace id, span id, whether it is the span with the error status).
Acked = tuple[bytes, bytes, bool]


class RecordingExporter(OTLPSpanExporter):
    """The OTel SDK's OTLP/HTTP exporter, noting the spans of every batch the gateway acknowledged."""

    def __init__(self, acked: list[Acked], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.acked = acked

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        if result is SpanExportResult.SUCCESS:
            for span in spans:
                context = span.get_span_context()
                assert context is not None
                self.acked.append(
                    (
                        context.trace_id.to_bytes(16, "big"),
                        context.span_id.to_bytes(8, "big"),
                        span.status.status_code is StatusCode.ERROR,
                    )
                )
        return result


def emit_until(url: str, stop: threading.Event, acked: list[Acked], errors: set[bytes]) -> None:
    """Emit traces (every other one with an error on a child span, its id put in `errors`) from two
    services with the OTel SDK until `stop` is set; every span the gateway acknowledged lands in `acked`."""
    providers = []
    for service in ("frontend", "backend"):
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exporter = RecordingExporter(acked, endpoint=url, timeout=2)
        provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=20))
        providers.append(provider)
    root_tracer = providers[0].get_tracer("tests.frontend")
    child_tracer = providers[1].get_tracer("tests.backend")
    number = 0
    while not stop.is_set():
        root = root_tracer.start_span("GET /checkout", kind=trace.SpanKind.SERVER)
        context = trace.set_span_in_context(root)
        for index in range(3):
            child = child_tracer.start_span(f"query {index}", context=context)
            if number % 2 == 0 and index == 1:
                child.set_status(trace.Status(StatusCode.ERROR, "deadlock"))
                errors.add(root.get_span_context().trace_id.to_bytes(16, "big"))
            child.end()
        root.end()
        number += 1
        stop.wait(0.004)
    for provider in providers:
        provider.force_flush()
        provider.shutdown()


def wal_config(downstream_port: int, directory: Path, durability: str, **wal: Any) -> dict[str, Any]:
    config = gateway_config(
        None,
        policies=ERRORS_ONLY,
        decision_wait="1.5s",
        decision_wait_after_root_received="1.5s",
    )
    config["exporters"] = {
        "otlp_http": {
            "endpoint": f"http://127.0.0.1:{downstream_port}/v1/traces",
            "batch": {"timeout": "0.02s"},
            "retry_on_failure": {"initial_interval": "0.05s", "max_interval": "0.2s"},
        }
    }
    config["durability"] = durability
    config["wal"] = {"directory": str(directory), "checkpoint_interval": "0.2s", **wal}
    return config


def captured_span_count(path: Path) -> int:
    """Spans in a capture file (OTLP JSON lines)."""
    return sum(
        len(scope_spans.get("spans", []))
        for line in path.read_text().splitlines()
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
    )


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


@pytest.mark.parametrize("durability", ["wal", "none"])
async def test_acknowledged_spans_of_kept_traces_survive_kill_9(tmp_path: Path, durability: str) -> None:
    """Spans flow for 3 s, the gateway is killed with traces buffered, then restarted and stopped: with
    the log every acknowledged span of a kept trace arrives; without it (the control) some are lost."""
    downstream = Downstream()
    port = free_port()
    await downstream.start(port)
    directory = tmp_path / "wal"
    config = wal_config(port, directory, durability, fsync="always", segment_bytes=256 * 1024)
    url = f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces"
    acked: list[Acked] = []
    errors: set[bytes] = set()
    stop = threading.Event()
    process = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin_port(config), process)
        sender = threading.Thread(target=emit_until, args=(url, stop, acked, errors))
        sender.start()
        await asyncio.sleep(3.0)
        process.kill()  # mid-stream: the sender keeps going and gets connection errors
        await asyncio.to_thread(process.wait, 10)
        delivered_before = len(downstream.delivered_spans())
        stop.set()
        await asyncio.to_thread(sender.join, 30)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    acked_at_kill = list(acked)
    on_disk = sum(path.stat().st_size for path in segments(directory))

    restarted = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin_port(config), restarted)
        replayed = await scrape(admin_port(config), "tailgate_wal_replayed_spans_total")
        restarted.send_signal(signal.SIGTERM)  # decides what was replayed, flushes, empties the log
        await asyncio.to_thread(restarted.wait, 30)
    finally:
        if restarted.poll() is None:
            restarted.kill()
        await downstream.stop()
    assert restarted.returncode == 0

    # Kept: traces whose error span was acknowledged. A trace whose error span was logged but whose reply
    # was cut by the kill is kept too (at least once); a trace without an error never arrives.
    kept = {trace_id for trace_id, _, error in acked_at_kill if error}
    expected = {(trace_id, span_id) for trace_id, span_id, _ in acked_at_kill if trace_id in kept}
    arrived = Counter((span.trace_id, span.span_id) for span in downstream.delivered_spans())
    lost = expected - set(arrived)
    dropped_arrived = {key for key in arrived if key[0] not in errors}
    duplicates = sum(arrived.values()) - len(arrived)
    print(
        f"\nkill -9, durability {durability}: {len(acked_at_kill)} spans acknowledged, {len(kept)} kept "
        f"traces ({len(expected)} acknowledged spans); {delivered_before} delivered before the kill, "
        f"{on_disk} bytes of log left, {replayed:g} spans replayed; lost {len(lost)}, "
        f"duplicates {duplicates}"
    )
    assert len(kept) > 50
    assert not dropped_arrived
    if durability == "wal":
        assert not lost
        assert replayed > 0
        assert segments(directory) == []  # emptied at the clean shutdown
    else:
        assert lost  # the control: what the log is for


async def scrape(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as reply:
        text = await reply.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def request_of(trace_number: int, spans: int = 4, error: bool = False) -> ExportTraceServiceRequest:
    """One trace of `spans` spans (a root and children), its second span with an error if `error`."""
    trace_id = trace_number.to_bytes(16, "big")
    scope_spans = ScopeSpans()
    for index in range(spans):
        span = scope_spans.spans.add(
            trace_id=trace_id,
            span_id=(trace_number * 100 + index + 1).to_bytes(8, "big"),
            parent_span_id=b"" if index == 0 else (trace_number * 100 + 1).to_bytes(8, "big"),
            name=f"op {index}",
            start_time_unix_nano=1_700_000_000_000_000_000,
            end_time_unix_nano=1_700_000_000_001_000_000,
        )
        if error and index == 1:
            span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(scope_spans=[scope_spans])])


async def test_checkpoints_delete_segments_while_traffic_flows(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    downstream = Downstream()
    await downstream.start(free_port())
    directory = tmp_path / "wal"
    config = wal_config(downstream.port, directory, "wal", segment_bytes=4096)
    config["tail_sampling"].update(decision_wait="0.3s", decision_wait_after_root_received="0.1s")
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    try:
        written = 0
        for number in range(1, 121):
            await send(url, request_of(number, error=number % 3 == 0))
            written += 1
        peak = len(segments(directory))
        kept_spans = 40 * 4
        await wait_for(lambda: len(downstream.delivered_spans()) >= kept_spans, timeout=15)
        # Decided and exported: the checkpoint passes them and their segments go.
        await wait_for(lambda: len(segments(directory)) <= 1, timeout=10)
        checkpoint = gateway.wal.checkpoint if gateway.wal else -1
        bytes_left = metric(gateway, "tailgate_wal_bytes")
    finally:
        await gateway.stop()
        await downstream.stop()
    print(f"\ncheckpoints: {written} requests, {peak} segments at the peak, 1 left; checkpoint {checkpoint}")
    assert peak > 5
    assert checkpoint == written
    assert bytes_left < 4096 + 1024
    assert len(downstream.delivered_spans()) == kept_spans
    assert segments(directory) == []


def crash(wal: WriteAheadLog) -> None:
    """What kill -9 leaves: the files as written, the lock released, nothing checkpointed or deleted."""
    for task in wal._tasks:
        task.cancel()
    for segment in wal._segments:
        if segment.fd >= 0:
            os.close(segment.fd)
    for fd in (*wal._unsynced, wal._dir_fd, wal._lock_fd):
        os.close(fd)


def new_log(directory: Path) -> tuple[WriteAheadLog, DecisionCache]:
    decisions = DecisionCache(100, 100)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, lambda: 0.0)
    config = WALConfig(directory=str(directory), fsync="never", segment_bytes=1 << 20)
    return WriteAheadLog(config, Metrics(), buffer, decisions, []), decisions


async def test_segments_left_by_a_kill_during_a_checkpoint_are_deleted_after_the_restart(
    tmp_path: Path,
) -> None:
    """Killed after the checkpoint was written and before the segments it passed were deleted: they were
    deleted only when the checkpoint moved again, which needs a request, and a full log takes none."""

    def small_log() -> WriteAheadLog:
        decisions = DecisionCache(100, 100)
        buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, lambda: 0.0)
        config = WALConfig(directory=str(tmp_path), fsync="never", segment_bytes=1000, max_bytes=2000)
        return WriteAheadLog(config, Metrics(), buffer, decisions, [])

    wal = small_log()
    await wal.open()
    number = 0
    while not wal.full:
        number += 1
        wal.append_request(request_of(number).SerializeToString())
    assert len(segments(tmp_path)) >= 2
    wal._write_checkpoint(wal.next_seq)  # everything decided and exported ...
    crash(wal)  # ... and killed before the segments below the checkpoint were deleted
    again = small_log()
    assert (await again.open()).requests == []
    again.advance()
    assert not again.full
    again.append_request(request_of(number + 1).SerializeToString())
    crash(again)


async def test_an_idle_log_does_not_write_its_carried_decisions_again_and_again(tmp_path: Path) -> None:
    """Kept decisions still cached are carried to a new segment when theirs is deleted, numbered below the
    checkpoint; deleting below the checkpoint at every round, even one that did not move it, deleted and
    wrote them again in each round, with no traffic at all."""
    decisions = DecisionCache(1000, 1000)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, lambda: 0.0)
    config = WALConfig(directory=str(tmp_path), fsync="never", segment_bytes=1000, max_bytes=100_000)
    wal = WriteAheadLog(config, Metrics(), buffer, decisions, [])
    await wal.open()
    wal.append_request(request_of(1).SerializeToString())
    for number in range(200):  # 3200 bytes of kept decisions: over a segment
        decisions.record(number.to_bytes(16, "big"), Kept("keep", 1.0))
    wal.append_request(request_of(2).SerializeToString())  # the decisions are written first
    wal.advance()  # everything decided (nothing buffered, no exporter): checkpointed, segments deleted
    wal.advance()
    settled = [path.name for path in segments(tmp_path)]
    for _ in range(3):  # no traffic from here on
        wal.advance()
    assert [path.name for path in segments(tmp_path)] == settled
    await wal.close()


async def test_a_short_write_counts_in_the_log_size(tmp_path: Path) -> None:
    """What a write the disk had room for in part left in the torn segment counts in `bytes` (the
    tailgate_wal_bytes gauge, held against max_bytes) until the segment is deleted: it was left out, and
    subtracted when the segment went, so the gauge drifted low, below zero."""
    wal, _ = new_log(tmp_path)
    await wal.open()
    body = request_of(1).SerializeToString()
    wal.append_request(body)
    assert wal._active is not None
    size = wal._active.size
    # Room for half of the next record only: a file size limit.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + len(body) // 2, hard))
    try:
        with pytest.raises(WALError, match="short write"):
            wal.append_request(body)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    wal.append_request(body)  # to a new segment
    assert wal.bytes == sum(path.stat().st_size for path in segments(tmp_path))
    wal.advance()  # nothing buffered, no exporter: everything checkpointed, the torn segment deleted
    assert wal.bytes == sum(path.stat().st_size for path in segments(tmp_path))
    await wal.close()


async def test_a_torn_or_damaged_record_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    wal, decisions = new_log(tmp_path)
    await wal.open()
    bodies = [request_of(number).SerializeToString() for number in range(1, 5)]
    for body in bodies:
        wal.append_request(body)
    decisions.record(b"\x01" * 16, Kept("errors", 1.0))
    decisions.record(b"\x02" * 16, None)
    wal.append_request(bodies[0])  # writes the decisions first
    crash(wal)
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    second = data.find(b"TGw\x01", 1)
    data[second + 40] ^= 0xFF  # a flipped bit inside the second record
    segment.write_bytes(bytes(data[:-7]))  # and the last record torn

    again, restored = new_log(tmp_path)
    replay = await again.open()
    assert [body for _, body in replay.requests] == [bodies[0], bodies[2], bodies[3]]
    assert [seq for seq, _ in replay.requests] == [0, 2, 3]
    assert replay.corrupt == 2
    assert dict(replay.decisions) == {b"\x01" * 16: Kept("errors", 1.0), b"\x02" * 16: None}
    assert again.next_seq == 4  # after the last sound record (the torn one was never whole)
    assert again.append_request(bodies[1]) == 4
    crash(again)
    assert restored.lookup(b"\x01" * 16) is None  # replay_decisions puts them in (tested end to end)


def forged_record(seq: int, body: bytes) -> bytes:
    """A sound record, as a client could hide one in a span attribute."""
    crc = zlib.crc32(body, zlib.crc32(_CHECKED.pack(REQUEST, seq)))
    return HEADER.pack(MAGIC, len(body) + _CHECKED.size, crc, REQUEST, seq) + body


@pytest.mark.parametrize("damage", ["torn", "flipped"])
async def test_a_record_hidden_in_client_data_is_never_replayed(tmp_path: Path, damage: str) -> None:
    """Client bytes inside a damaged record are not searched for records: a record forged there (here
    with a seq that would overflow the numbering) is skipped with the record around it."""
    wal, _ = new_log(tmp_path)
    await wal.open()
    first = request_of(1).SerializeToString()
    wal.append_request(first)
    evil = request_of(2)
    fake = forged_record((1 << 64) - 2, request_of(3).SerializeToString())
    evil.resource_spans[0].scope_spans[0].spans[0].attributes.add(key="x").value.bytes_value = fake + bytes(
        64
    )
    wal.append_request(evil.SerializeToString())
    last = request_of(4).SerializeToString()
    wal.append_request(last)
    crash(wal)
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    evil_start = data.find(MAGIC, 1)
    if damage == "torn":  # the crash cut the second record inside its body, after the forged one
        data = data[: data.find(fake) + len(fake) + 10]
    else:  # a flipped bit in the second record's body
        data[data.find(fake) - 3] ^= 0x01
    segment.write_bytes(bytes(data))
    assert data.find(fake) > evil_start

    again, _ = new_log(tmp_path)
    replay = await again.open()
    expected = [(0, first)] if damage == "torn" else [(0, first), (2, last)]
    assert replay.requests == expected
    assert replay.corrupt == 1
    assert again.next_seq == expected[-1][0] + 1
    assert again.append_request(first) == expected[-1][0] + 1
    crash(again)


async def logged(directory: Path, requests: int) -> tuple[WriteAheadLog, list[bytes]]:
    """A new log in `directory` with `requests` requests appended (seqs 0 and on), and their bodies."""
    wal, _ = new_log(directory)
    await wal.open()
    bodies = [request_of(number).SerializeToString() for number in range(1, requests + 1)]
    for body in bodies:
        wal.append_request(body)
    return wal, bodies


async def test_numbering_goes_on_after_a_clean_shutdown_so_a_later_crash_replays(tmp_path: Path) -> None:
    wal, bodies = await logged(tmp_path, 3)
    await wal.close()  # everything decided and exported: the log is emptied, the checkpoint is 3
    assert segments(tmp_path) == []

    again, _ = new_log(tmp_path)
    assert (await again.open()).requests == []
    assert (again.checkpoint, again.next_seq) == (3, 3)
    assert again.append_request(bodies[0]) == 3
    crash(again)  # accepted in this run, then kill -9

    third, _ = new_log(tmp_path)
    assert (await third.open()).requests == [(3, bodies[0])]
    crash(third)


async def test_decisions_whose_record_could_not_be_written_are_written_with_the_next(tmp_path: Path) -> None:
    wal, decisions = new_log(tmp_path)
    await wal.open()
    body = request_of(1).SerializeToString()
    wal.append_request(body)
    decisions.record(b"\x01" * 16, Kept("errors", 1.0))
    assert wal._active is not None
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, wal._active.fd)  # the disk is full for this segment
    os.close(full)
    with pytest.raises(WALError, match="cannot write"):
        wal.append_request(body)  # the decisions record is written first, and fails
    assert wal.append_request(body) == 1  # a new segment: the decisions, then the request
    crash(wal)

    again, _ = new_log(tmp_path)
    replay = await again.open()
    assert replay.decisions == [(b"\x01" * 16, Kept("errors", 1.0))]
    assert [seq for seq, _ in replay.requests] == [0, 1]
    crash(again)


def synced_log(directory: Path) -> tuple[WriteAheadLog, TraceBuffer, Ingest, Metrics]:
    """A log with `fsync: always` and the ingest of a receiver writing to it."""
    decisions = DecisionCache(100, 100)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, lambda: 0.0)
    buffer.connect(lambda traces, reason: None, lambda late: None)
    metrics = Metrics()
    config = WALConfig(directory=str(directory), fsync="always")
    wal = WriteAheadLog(config, metrics, buffer, decisions, [])
    return wal, buffer, Ingest("otlp_http", buffer, metrics, lambda result: None, wal=wal), metrics


async def accept(ingest: Ingest, number: int) -> None:
    body = request_of(number).SerializeToString()
    result = ingest.add(decode_protobuf(body), body)
    await asyncio.wait_for(ingest.committed(result), timeout=5)


async def test_running_out_of_file_descriptors_for_a_moment_does_not_stop_the_syncing(tmp_path: Path) -> None:
    wal, buffer, ingest, _ = synced_log(tmp_path)
    await wal.open()
    wal.start()
    await accept(ingest, 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hog: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 32, hard))
        with contextlib.suppress(OSError):
            while True:
                hog.append(os.open("/dev/null", os.O_RDONLY))
        os.close(hog.pop())  # room for the request's write, none for the syncer's duplicates
        body = request_of(2).SerializeToString()
        waiting = asyncio.ensure_future(ingest.committed(ingest.add(decode_protobuf(body), body)))
        await asyncio.sleep(0.2)  # the syncer tried meanwhile
        assert not waiting.done()
    finally:
        for fd in hog:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await asyncio.wait_for(waiting, timeout=5)  # synced once descriptors are free again
    await accept(ingest, 3)
    assert buffer.span_count == 12
    await wal.close()


async def test_a_failed_fsync_answers_the_request_as_accepted_so_it_is_not_sent_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request was logged and buffered before the fsync failed: a 503 would have its client send it
    again, and its spans buffered and exported twice."""
    wal, buffer, ingest, metrics = synced_log(tmp_path)
    await wal.open()
    wal.start()
    fsync_all = sampler.wal.fsync_all

    def failing_once(fds: list[int]) -> None:  # the disk fails one fsync (EIO)
        monkeypatch.setattr(sampler.wal, "fsync_all", fsync_all)
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sampler.wal, "fsync_all", failing_once)
    await accept(ingest, 1)  # answered, not refused
    await accept(ingest, 2)
    assert buffer.span_count == 8
    assert metrics.registry.get_sample_value("tailgate_wal_write_errors_total") == 1
    assert (
        metrics.registry.get_sample_value(
            "tailgate_receiver_spans_total", {"protocol": "otlp_http", "outcome": "accepted"}
        )
        == 8
    )
    await wal.close()


async def test_decisions_logged_before_any_request_and_a_decisions_record_filling_its_segment(
    tmp_path: Path,
) -> None:
    """A member handed decisions before its first request logs them (as seq 0), and a decisions record
    that fills its segment closes it like any record."""
    decisions = DecisionCache(100, 100)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, lambda: 0.0)
    config = WALConfig(directory=str(tmp_path), fsync="never", segment_bytes=100)
    wal = WriteAheadLog(config, Metrics(), buffer, decisions, [])
    await wal.open()
    kept = [bytes([n]) * 16 for n in range(1, 6)]
    for trace_id in kept:
        decisions.record(trace_id, Kept("errors", 1.0))
    body = request_of(1).SerializeToString()
    assert wal.append_request(body) == 0  # the decisions record (over 100 bytes) closed the first segment
    assert wal.append_request(body) == 1
    first = wal._segments[0]
    assert first.kept == kept and first.max_seq == 0
    crash(wal)

    again, _ = new_log(tmp_path)
    replay = await again.open()
    assert [trace_id for trace_id, _ in replay.decisions] == kept
    assert [seq for seq, _ in replay.requests] == [0, 1]
    crash(again)


async def test_records_after_one_with_a_damaged_length_are_replayed(tmp_path: Path) -> None:
    wal, _ = await logged(tmp_path, 5)
    crash(wal)
    (segment,) = segments(tmp_path)
    data = bytearray(segment.read_bytes())
    third = data.find(MAGIC, data.find(MAGIC, 1) + 1)
    data[third + 4 : third + 8] = (1 << 31).to_bytes(4, "big")  # its length now points past the end
    segment.write_bytes(bytes(data))

    again, _ = new_log(tmp_path)
    replay = await again.open()
    assert [seq for seq, _ in replay.requests] == [0, 1, 3, 4]
    assert replay.corrupt == 1
    crash(again)


def test_decision_records_round_trip() -> None:
    decided = [(bytes([n]) * 16, Kept("p", 0.25) if n % 2 else None) for n in range(1, 7)]
    assert sorted(decode_decisions(encode_decisions(decided)), key=lambda d: d[0]) == decided
    with pytest.raises(ValueError, match="not a decisions record"):
        decode_decisions(b"\x93")
    with pytest.raises(ValueError, match="multiple of 16"):
        decode_decisions(encode_decisions([])[:1] + b"\xc4\x03abc\x90")


async def test_a_failed_write_refuses_the_request_and_the_next_goes_to_a_new_segment(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    downstream = Downstream()
    await downstream.start(free_port())
    directory = tmp_path / "wal"
    gateway = await start_gateway(wal_config(downstream.port, directory, "wal"))
    url = receiver_url(gateway)
    try:
        await send(url, request_of(1, error=True))
        wal = gateway.wal
        assert wal is not None and wal._active is not None
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, wal._active.fd)  # the disk is full from now on for this segment
        os.close(full)
        status, _, body = await post(url, request_of(2, error=True).SerializeToString(), PROTOBUF)
        assert status == 503
        assert b"cannot write the write-ahead log" in body
        await send(url, request_of(3, error=True))  # a new segment
        errors = metric(gateway, "tailgate_wal_write_errors_total")
        refused = metric(
            gateway,
            "tailgate_receiver_rejected_requests_total",
            protocol="otlp_http",
            reason="wal_unavailable",
        )
        await wait_for(lambda: len(downstream.delivered_spans()) >= 8, timeout=10)
    finally:
        await gateway.stop()
        await downstream.stop()
    traces = {span.trace_id for span in downstream.delivered_spans()}
    assert traces == {(1).to_bytes(16, "big"), (3).to_bytes(16, "big")}  # nothing of the refused one
    assert errors == 1
    assert refused == 1


# segment_bytes over max_bytes (the default, 64 MiB): the one segment was the active one, never deleted,
# and the log refused every request for good.
@pytest.mark.parametrize("segment_bytes", [1000, None])
async def test_a_full_log_refuses_with_retry_after_until_exports_catch_up(
    start_gateway: GatewayFactory, tmp_path: Path, segment_bytes: int | None
) -> None:
    downstream = Downstream()
    await downstream.start(free_port())
    sizes = (
        {"max_bytes": 2000} if segment_bytes is None else {"max_bytes": 2000, "segment_bytes": segment_bytes}
    )
    config = wal_config(downstream.port, tmp_path / "wal", "wal", **sizes)
    config["tail_sampling"].update(decision_wait="0.2s", decision_wait_after_root_received="0.1s")
    capture = tmp_path / "capture.jsonl"
    config["capture"] = {"path": str(capture), "batch": {"timeout": "0.02s"}}
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    try:
        statuses = []
        retry_after = None
        for number in range(1, 11):
            async with aiohttp.ClientSession() as session:
                body = request_of(number, error=True).SerializeToString()
                async with session.post(url, data=body, headers=PROTOBUF) as reply:
                    statuses.append(reply.status)
                    retry_after = reply.headers.get("Retry-After", retry_after)
        accepted = statuses.count(200)
        # Once decided and exported, the log is checkpointed and takes requests again.
        await wait_for(lambda: gateway.wal is not None and not gateway.wal.full, timeout=10)
        await send(url, request_of(99, error=True))
    finally:
        await gateway.stop()
        await downstream.stop()
    print(f"\nfull log: statuses {statuses}")
    # The capture holds what was taken, not the refused requests the client would send again.
    assert captured_span_count(capture) == (accepted + 1) * 4
    assert 0 < accepted < 10
    assert set(statuses) == {200, 503}
    assert retry_after == "1"


async def test_decisions_survive_a_crash_so_late_spans_follow_them(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Traces decided before a crash: after the restart their late spans follow the logged decision."""
    downstream = Downstream()
    await downstream.start(free_port())
    directory = tmp_path / "wal"
    config = wal_config(downstream.port, directory, "wal")
    config["tail_sampling"].update(decision_wait="0.2s", decision_wait_after_root_received="0.1s")
    first = await start_gateway(config)
    try:
        await send(receiver_url(first), request_of(1, error=True))  # kept
        await send(receiver_url(first), request_of(2, error=False))  # dropped
        await wait_for(lambda: len(downstream.delivered_spans()) == 4, timeout=10)
        await wait_for(lambda: metric(first, "tailgate_traces_decided_total", decision="dropped") == 1)
        assert first.wal is not None
        first.wal.advance()  # writes the decisions (a request arriving would too)
        await abandon(first)
        second = await start_gateway(config)
        late = request_of(1)
        late.resource_spans[0].scope_spans[0].spans[0].span_id = b"\x09" * 8
        late_dropped = request_of(2)
        late_dropped.resource_spans[0].scope_spans[0].spans[0].span_id = b"\x08" * 8
        await send(receiver_url(second), late)
        await send(receiver_url(second), late_dropped)
        await wait_for(lambda: metric(second, "tailgate_late_spans_total", decision="kept") >= 1, timeout=10)
        await second.stop()
    finally:
        await downstream.stop()
    arrived = {span.span_id for span in downstream.delivered_spans()}
    assert b"\x09" * 8 in arrived
    assert b"\x08" * 8 not in arrived


async def abandon(gateway: Gateway) -> None:
    """Stop a gateway but leave its log as kill -9 would."""
    assert gateway.wal is not None
    crash(gateway.wal)
    gateway.wal = None
    if gateway.cluster is not None:  # nothing the stop hands over is noted in the log
        gateway.cluster.handed_over = lambda trace_ids: None
    await gateway.stop()


async def test_spans_over_every_protocol_are_logged_and_replayed_whole(
    start_gateway: GatewayFactory,
    downstream: ConftestDownstream,
    grpc_downstream: GRPCDownstream,
    tmp_path: Path,
) -> None:
    """A trace whose spans came over OTLP/gRPC, Zipkin and OTLP/HTTP, buffered when the gateway dies: after
    the restart it is decided from the log and arrives whole, Zipkin span mapped as before."""
    config = all_protocols_config(downstream, grpc_downstream)
    config["tail_sampling"].update(decision_wait="30s", decision_wait_after_root_received="30s")
    config["durability"] = "wal"
    config["wal"] = {"directory": str(tmp_path / "wal"), "fsync": "never"}
    first = await start_gateway(config)
    kept_id, dropped_id = random.randbytes(16), random.randbytes(16)
    kept_spans = await send_trace_over_three_protocols(first, kept_id, error=True)
    await send_trace_over_three_protocols(first, dropped_id, error=False)
    first.decider.drop_pending_on_shutdown = True  # as if it died: nothing decided, nothing exported
    await abandon(first)

    config["tail_sampling"].update(decision_wait="0.2s", decision_wait_after_root_received="0.1s")
    second = await start_gateway(config)
    await wait_for(lambda: len(downstream.spans()) == 3 and len(grpc_downstream.spans()) == 3)
    await wait_for(lambda: metric(second, "tailgate_traces_decided_total", decision="dropped") == 1)
    assert metric(second, "tailgate_wal_replayed_spans_total") == 6
    for backend in (downstream, grpc_downstream):
        spans = [span for _, _, span in backend.spans()]
        assert sorted(span.span_id for span in spans) == sorted(kept_spans)
        assert {span.trace_id for span in spans} == {kept_id}
    zipkin = [span for _, _, span in downstream.spans() if span.name == "charge card"]
    assert len(zipkin) == 1 and zipkin[0].status.code == Status.STATUS_CODE_ERROR


def member_configs(
    downstream_port: int, tmp_path: Path, me: str, other: str, peers: list[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two cluster members that keep every trace: `me` with the write-ahead log and `peers` as its ring,
    holding its traces (decision_wait 60 s) past a crash; `other` without the log, in a ring of both,
    deciding within 0.2 s."""
    config = wal_config(downstream_port, tmp_path / "wal", "wal", fsync="always")
    config["tail_sampling"].update(
        policies=[{"name": "all", "type": "always_sample"}],
        decision_wait="60s",
        decision_wait_after_root_received="60s",
    )
    config["cluster"] = {"endpoint": me, "peers": peers}
    other_config = wal_config(downstream_port, tmp_path / "unused", "none")
    other_config["tail_sampling"].update(
        policies=[{"name": "all", "type": "always_sample"}],
        decision_wait="0.2s",
        decision_wait_after_root_received="0.2s",
    )
    other_config["cluster"] = {"endpoint": other, "peers": [me, other]}
    return config, other_config


def restarting(config: dict[str, Any], peers: list[str]) -> dict[str, Any]:
    """`config` for the restart after a crash: `peers` as its ring, deciding within 0.3 s."""
    config["cluster"]["peers"] = peers
    config["tail_sampling"].update(decision_wait="0.3s", decision_wait_after_root_received="0.2s")
    return config


async def died(gateway: Gateway) -> None:
    """As kill -9: nothing more decided, exported or logged."""
    gateway.decider.drop_pending_on_shutdown = True
    await abandon(gateway)


async def each_exactly_once(downstream: Downstream, spans: int) -> None:
    """Once `spans` spans have arrived, and a moment later (anything sent twice arrives meanwhile), each
    arrived once."""
    await wait_for(lambda: len(downstream.delivered_spans()) >= spans)
    await asyncio.sleep(0.5)
    arrived = Counter((span.trace_id, span.span_id) for span in downstream.delivered_spans())
    assert len(arrived) == spans and set(arrived.values()) == {1}


async def test_a_cluster_member_replays_only_its_own_traces_not_those_it_forwarded(tmp_path: Path) -> None:
    """A member logs each client request whole, spans of other members' traces included; those went to
    their owners as they arrived (which log them in turn). After kill -9 it replays only the traces it
    owns: replayed too, the others were decided a second time here, each span exported twice."""
    downstream = Downstream()
    await downstream.start(free_port())
    me, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config, other_config = member_configs(downstream.port, tmp_path, me, other, [me, other])
    owner = Gateway(parse_config(other_config))
    await owner.start()
    request = make_request(40, 3)
    ring = Ring([me, other])
    owned_there = {
        span.trace_id
        for span in request.resource_spans[0].scope_spans[0].spans
        if ring.owner(span.trace_id) == other
    }
    assert 0 < len(owned_there) < 40
    process = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin_port(config), process)
        url = f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces"
        await send(url, request)
        await wait_for(lambda: len(downstream.delivered_spans()) == 3 * len(owned_there), timeout=10)
        process.kill()
        await asyncio.to_thread(process.wait, 10)
        restarted = run_gateway(restarting(config, [me, other]), tmp_path / "config.yaml")
        try:
            await wait_ready(admin_port(config), restarted)
            await each_exactly_once(downstream, 120)
        finally:
            restarted.kill()
    finally:
        if process.poll() is None:
            process.kill()
        await owner.stop()
        await downstream.stop()


async def test_traces_a_member_owned_before_a_crash_go_to_their_new_owners_after_it(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A member alone in its ring logs and buffers every trace, and is killed. It comes back with another
    member in its ring: it replays them all (none was forwarded) and hands the other member its share,
    each trace decided once, by its owner."""
    downstream = Downstream()
    await downstream.start(free_port())
    me, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config, other_config = member_configs(downstream.port, tmp_path, me, other, [me])
    try:
        first = await start_gateway(config)
        await send(receiver_url(first), make_request(40, 3))
        await died(first)
        owner = await start_gateway(other_config)
        again = await start_gateway(restarting(config, [me, other]))
        await each_exactly_once(downstream, 120)
        ring = Ring([me, other])
        theirs = {
            span.trace_id for span in downstream.delivered_spans() if ring.owner(span.trace_id) == other
        }
        assert theirs
        assert metric(owner, "tailgate_traces_decided_total", decision="kept") == len(theirs)
        assert metric(again, "tailgate_traces_decided_total", decision="kept") == 40 - len(theirs)
    finally:
        await downstream.stop()


async def test_traces_handed_over_before_a_crash_are_not_handed_over_again_after_it(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A member hands its buffered traces to a member that joined, which decides them; then it is
    killed. The log notes what the other member took, so the restart does not replay and hand those
    traces over a second time (each exported twice)."""
    downstream = Downstream()
    await downstream.start(free_port())
    me, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config, other_config = member_configs(downstream.port, tmp_path, me, other, [me])
    try:
        await start_gateway(other_config)
        first = await start_gateway(config)
        await send(receiver_url(first), make_request(40, 3))
        assert first.cluster is not None
        await first.cluster._apply((me, other))  # as a membership change would
        assert await first.cluster.forwarder.flush(5.0)
        await wait_for(lambda: len(downstream.delivered_spans()) > 0)
        await died(first)
        await start_gateway(restarting(config, [me, other]))
        await each_exactly_once(downstream, 120)
    finally:
        await downstream.stop()


@pytest.mark.parametrize("log_full", [False, True])
async def test_spans_taken_back_from_a_member_that_left_are_logged_again_and_replayed_once(
    start_gateway: GatewayFactory, tmp_path: Path, log_full: bool
) -> None:
    """Spans queued for a member that leaves before it took them are taken back and buffered here, logged
    again (over the log's bound when it is full: they were accepted already); a crash then replays them
    once, not also from the request they came in (which noted them as the other member's), nor never."""
    downstream = Downstream()
    await downstream.start(free_port())
    me, other = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nobody listens at `other`
    config, _ = member_configs(downstream.port, tmp_path, me, other, [me, other])
    if log_full:
        config["wal"]["max_bytes"] = 1000  # the one client request fills it
    try:
        first = await start_gateway(config)
        await send(receiver_url(first), make_request(40, 3))
        assert first.cluster is not None and first.wal is not None and first.wal.full == log_full
        assert first.cluster.forwarder.pending(other).spans > 0
        await first.cluster._apply((me,))  # `other` left: its queue is taken back
        assert first.cluster.forwarder.pending(other).spans == 0
        assert len(first.buffer.traces) == 40
        await died(first)
        config["wal"]["max_bytes"] = 1 << 30
        await start_gateway(restarting(config, [me]))
        await each_exactly_once(downstream, 120)
    finally:
        await downstream.stop()
