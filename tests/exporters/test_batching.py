"""The shared batching core, through a minimal exporter that records or fails its sends."""

from __future__ import annotations

import asyncio

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sampler.config import BatchConfig
from sampler.exporters.batching import BatchingExporter
from sampler.logthrottle import LogThrottle
from sampler.metrics import Metrics

from .helpers import eventually, make_group, make_scope, make_trace, sample

NAME = "memory"
SERVICE = make_scope("checkout")


class RecordingExporter(BatchingExporter):
    """Keeps each batch's decoded request; raises `failure` on the sends listed in `fail_on`."""

    def __init__(self, metrics: Metrics, fail_on: set[int], failure: Exception) -> None:
        super().__init__(NAME, BatchConfig(send_batch_size=2, timeout=10), metrics)
        self.fail_on = fail_on
        self.failure = failure
        self.sends = 0
        self.requests: list[ExportTraceServiceRequest] = []

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, body: bytes, span_count: int) -> int:
        self.sends += 1
        if self.sends in self.fail_on:
            raise self.failure
        self.requests.append(ExportTraceServiceRequest.FromString(body))
        return 0


async def test_a_crashing_send_fails_one_batch_only(metrics: Metrics) -> None:
    exporter = RecordingExporter(metrics, {1}, RuntimeError("bug"))
    await exporter.start()
    for number in (1, 2):
        exporter.export([make_group(SERVICE, make_trace(number, 2))], 2)
    await exporter.shutdown(1)
    assert sample(metrics, "tailgate_exporter_failed_spans_total", NAME) == 2
    assert sample(metrics, "tailgate_exporter_sent_spans_total", NAME) == 2
    assert len(exporter.requests) == 1


async def test_spans_exported_before_start_are_sent_after(metrics: Metrics) -> None:
    exporter = RecordingExporter(metrics, set(), RuntimeError())
    exporter.export([make_group(SERVICE, make_trace(1, 2))], 2)
    exporter.export([], 0)
    await asyncio.sleep(0)
    assert exporter.requests == []
    await exporter.start()
    await eventually(lambda: len(exporter.requests) == 1)
    await exporter.shutdown(1)


async def test_shutdown_without_start_counts_batched_spans_as_failed(metrics: Metrics) -> None:
    exporter = RecordingExporter(metrics, set(), RuntimeError())
    exporter.export([make_group(SERVICE, make_trace(1, 1))], 1)
    await exporter.shutdown(1)
    assert sample(metrics, "tailgate_exporter_failed_spans_total", NAME) == 1
    assert sample(metrics, "tailgate_exporter_queue_spans", NAME) == 0


def test_log_throttle_lets_one_message_through_per_interval() -> None:
    throttle = LogThrottle(interval=60)
    assert [throttle.allow() for _ in range(4)] == [True, False, False, False]
    assert throttle.take_suppressed() == 3
    assert throttle.take_suppressed() == 0
