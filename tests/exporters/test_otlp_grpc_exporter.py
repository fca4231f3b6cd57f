"""The OTLP/gRPC exporter against a real gRPC downstream: batches, gzip, metadata, retries, shutdown."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTracePartialSuccess
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.config import OTLPGRPCExporterConfig
from sampler.exporters.otlp_grpc import OTLPGRPCExporter, retry_delay
from sampler.metrics import Metrics
from tests.conftest import free_port
from tests.grpc_downstream import GRPCDownstream, Reply

from .helpers import eventually, make_group, make_scope, make_trace, sample

NAME = "otlp_grpc/backend"
SENT = "tailgate_exporter_sent_spans_total"
FAILED = "tailgate_exporter_failed_spans_total"
RETRIES = "tailgate_exporter_retries_total"
SERVICE = make_scope("checkout")
FAST_RETRY = {"initial_interval": 0.02, "max_interval": 0.05, "max_elapsed_time": 1.0}


async def started_exporter(
    endpoint: str,
    metrics: Metrics,
    *,
    batch: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
    **settings: Any,
) -> OTLPGRPCExporter:
    """An exporter with short batch and retry intervals, some overridden by `batch` and `retry`."""
    config = OTLPGRPCExporterConfig.model_validate(
        {
            "endpoint": endpoint,
            "batch": {"send_batch_size": 1000, "timeout": 0.02, **(batch or {})},
            "retry_on_failure": {**FAST_RETRY, **(retry or {})},
            **settings,
        }
    )
    exporter = OTLPGRPCExporter(NAME, config, metrics)
    await exporter.start()
    return exporter


def export_traces(exporter: OTLPGRPCExporter, count: int, spans: int, first: int = 1) -> list[Span]:
    """Export `count` traces of `spans` spans, one call per trace as the decider does; all their spans."""
    traces = [make_trace(number, spans) for number in range(first, first + count)]
    for trace in traces:
        exporter.export([make_group(SERVICE, trace)], spans)
    return [span for trace in traces for span in trace]


def received(downstream: GRPCDownstream) -> list[Span]:
    return [span for _, _, span in downstream.spans()]


async def test_batches_delivered_with_whole_traces(grpc_downstream: GRPCDownstream, metrics: Metrics) -> None:
    batch = {"send_batch_size": 6, "num_consumers": 1}
    exporter = await started_exporter(grpc_downstream.endpoint, metrics, batch=batch)
    sent = export_traces(exporter, 5, 3)
    await exporter.shutdown(1)
    assert received(grpc_downstream) == sent
    batches = [call.request.resource_spans[0].scope_spans[0].spans for call in grpc_downstream.calls]
    assert [len(spans) for spans in batches] == [6, 6, 3]
    assert sample(metrics, SENT, NAME) == 15
    assert sample(metrics, FAILED, NAME) == 0


@pytest.mark.parametrize("compression", ["gzip", "none"])
async def test_compression_on_the_wire(
    grpc_downstream: GRPCDownstream, metrics: Metrics, compression: str
) -> None:
    exporter = await started_exporter(grpc_downstream.endpoint, metrics, compression=compression)
    sent = export_traces(exporter, 2, 3)
    await exporter.shutdown(1)
    (call,) = grpc_downstream.calls
    assert call.compressed is (compression == "gzip")
    assert received(grpc_downstream) == sent


async def test_headers_sent_as_metadata(grpc_downstream: GRPCDownstream, metrics: Metrics) -> None:
    headers = {"Authorization": "Bearer s3cret", "X-Scope-OrgID": "tenant-1"}
    exporter = await started_exporter(grpc_downstream.endpoint, metrics, headers=headers)
    export_traces(exporter, 1, 1)
    await exporter.shutdown(1)
    (call,) = grpc_downstream.calls
    assert call.metadata["authorization"] == "Bearer s3cret"
    assert call.metadata["x-scope-orgid"] == "tenant-1"
    assert call.metadata["user-agent"].startswith("tailgate/")


async def test_unavailable_retried_then_delivered_once(
    grpc_downstream: GRPCDownstream, metrics: Metrics
) -> None:
    grpc_downstream.replies = [Reply(grpc.StatusCode.UNAVAILABLE), Reply(grpc.StatusCode.UNAVAILABLE)]
    exporter = await started_exporter(grpc_downstream.endpoint, metrics)
    sent = export_traces(exporter, 2, 2)
    await exporter.shutdown(1)
    assert len(grpc_downstream.calls) == 3
    assert received(grpc_downstream) == sent
    assert sample(metrics, RETRIES, NAME) == 2
    assert sample(metrics, SENT, NAME) == 4
    assert sample(metrics, FAILED, NAME) == 0


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.DATA_LOSS,
    ],
    ids=lambda code: code.name,
)
async def test_retryable_codes(grpc_downstream: GRPCDownstream, metrics: Metrics, code: Any) -> None:
    grpc_downstream.replies = [Reply(code)]
    exporter = await started_exporter(grpc_downstream.endpoint, metrics)
    sent = export_traces(exporter, 1, 2)
    await exporter.shutdown(1)
    assert received(grpc_downstream) == sent
    assert sample(metrics, RETRIES, NAME) == 1


async def test_resource_exhausted_with_retry_info_waits_the_told_delay(
    grpc_downstream: GRPCDownstream, metrics: Metrics
) -> None:
    grpc_downstream.replies = [Reply(grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.3)]
    exporter = await started_exporter(grpc_downstream.endpoint, metrics)
    sent = export_traces(exporter, 2, 2)
    await exporter.shutdown(2)
    first, second = grpc_downstream.calls
    assert second.at - first.at >= 0.3  # the backoff alone would wait at most 0.05 s
    assert received(grpc_downstream) == sent
    assert sample(metrics, RETRIES, NAME) == 1


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED],
    ids=lambda code: code.name,
)
async def test_not_retried(
    grpc_downstream: GRPCDownstream, metrics: Metrics, caplog: pytest.LogCaptureFixture, code: Any
) -> None:
    grpc_downstream.replies = [Reply(code)]
    exporter = await started_exporter(grpc_downstream.endpoint, metrics)
    with caplog.at_level(logging.WARNING):
        export_traces(exporter, 1, 3)
        await exporter.shutdown(1)
    assert len(grpc_downstream.calls) == 1
    assert grpc_downstream.requests == []
    assert sample(metrics, FAILED, NAME) == 3
    assert sample(metrics, RETRIES, NAME) == 0
    assert f"gRPC {code.name}: scripted {code.name} (not retryable)" in caplog.text


async def test_downstream_down_then_up(metrics: Metrics) -> None:
    port = free_port()
    exporter = await started_exporter(f"127.0.0.1:{port}", metrics, retry={"max_elapsed_time": 5})
    sent = export_traces(exporter, 2, 2)
    await eventually(lambda: sample(metrics, RETRIES, NAME) >= 2)
    downstream = GRPCDownstream()
    await downstream.start(port)
    try:
        await exporter.shutdown(3)
    finally:
        await downstream.stop()
    assert received(downstream) == sent
    assert sample(metrics, SENT, NAME) == 4
    assert sample(metrics, FAILED, NAME) == 0


async def test_call_over_timeout_retried_then_delivered_once(
    grpc_downstream: GRPCDownstream, metrics: Metrics
) -> None:
    grpc_downstream.hang = True
    exporter = await started_exporter(grpc_downstream.endpoint, metrics, timeout=0.05)
    sent = export_traces(exporter, 1, 2)
    await eventually(lambda: sample(metrics, RETRIES, NAME) >= 1)
    grpc_downstream.hang = False
    await exporter.shutdown(1)
    assert received(grpc_downstream) == sent
    assert len(grpc_downstream.calls) >= 2
    assert sample(metrics, SENT, NAME) == 2


async def test_partial_success_counts_rejected(
    grpc_downstream: GRPCDownstream, metrics: Metrics, caplog: pytest.LogCaptureFixture
) -> None:
    grpc_downstream.response.partial_success.CopyFrom(
        ExportTracePartialSuccess(rejected_spans=2, error_message="too old")
    )
    exporter = await started_exporter(grpc_downstream.endpoint, metrics)
    with caplog.at_level(logging.WARNING):
        export_traces(exporter, 1, 5)
        await exporter.shutdown(1)
    assert sample(metrics, SENT, NAME) == 3
    assert sample(metrics, FAILED, NAME) == 2
    assert "rejected 2 of 5 spans: too old" in caplog.text


async def test_shutdown_flushes_open_batch(grpc_downstream: GRPCDownstream, metrics: Metrics) -> None:
    exporter = await started_exporter(grpc_downstream.endpoint, metrics, batch={"timeout": 10})
    sent = export_traces(exporter, 3, 2)
    await exporter.shutdown(1)
    assert received(grpc_downstream) == sent
    assert sample(metrics, SENT, NAME) == 6


def status_details(*details: Any) -> tuple[tuple[str, bytes], ...]:
    status = Status(code=grpc.StatusCode.UNAVAILABLE.value[0])
    for detail in details:
        status.details.add().Pack(detail)
    return (("grpc-status-details-bin", status.SerializeToString()),)


def test_retry_delay_read_from_status_details() -> None:
    info = RetryInfo()
    info.retry_delay.FromMilliseconds(1500)
    assert retry_delay(status_details(info)) == 1.5
    assert retry_delay(status_details(Status(message="not RetryInfo"), info)) == 1.5
    assert retry_delay(status_details(Status(message="not RetryInfo"))) is None
    assert retry_delay((("grpc-status-details-bin", b"\xff\xff"),)) is None
    assert retry_delay((("other-bin", b""),)) is None
    assert retry_delay(None) is None
