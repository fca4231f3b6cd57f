"""The OTLP/gRPC receiver: the OTel SDK end to end, bad input answered with gRPC statuses, shutdown."""

from __future__ import annotations

import asyncio
import gzip
import random
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.rpc.error_details_pb2 import RetryInfo
from google.rpc.status_pb2 import Status
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from sampler.app import Gateway
from sampler.config import parse_config
from tests.conftest import Downstream, GatewayFactory, free_port, gateway_config, metric, wait_for
from tests.grpc_downstream import EXPORT, GRPCDownstream
from tests.otlp_data import make_request, send_sdk_traces
from tests.test_end_to_end import POLICIES, drained, expected_keeps

ACCEPTED = {"protocol": "otlp_grpc", "outcome": "accepted"}
REQUESTS = "tailgate_receiver_requests_total"
REFUSED = "tailgate_receiver_rejected_requests_total"


def grpc_gateway_config(downstream: Downstream, **sampling: Any) -> dict[str, Any]:
    """`gateway_config` with the OTLP/gRPC receiver as the only receiver."""
    config = gateway_config(downstream, **sampling)
    config["receivers"] = {"otlp": {"grpc": {"endpoint": f"127.0.0.1:{free_port()}"}}}
    return config


def port_of(gateway: Gateway) -> int:
    port = gateway.receivers[0].port
    assert port is not None
    return port


async def export(port: int, body: bytes, compression: grpc.Compression | None = None) -> bytes:
    """One Export call with `body` as the serialized request; the reply's bytes."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply: bytes = await channel.unary_unary(EXPORT)(body, timeout=5, compression=compression)
        return reply


async def export_error(port: int, body: bytes, compression: grpc.Compression | None = None) -> Any:
    """The grpc.aio.AioRpcError an Export call that must fail ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await export(port, body, compression)
    return caught.value


async def assert_still_serving(port: int, downstream: Downstream) -> None:
    request = make_request(traces=1, spans_per_trace=2)
    assert await export(port, request.SerializeToString()) == b""
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    await wait_for(lambda: trace_id in downstream.spans_by_trace())


@pytest.mark.parametrize("exporter", ["otlp_http", "otlp_grpc"])
async def test_sdk_grpc_traces_kept_exactly_by_policies(
    start_gateway: GatewayFactory, downstream: Downstream, grpc_downstream: GRPCDownstream, exporter: str
) -> None:
    config = grpc_gateway_config(downstream, policies=POLICIES)
    backend = downstream
    if exporter == "otlp_grpc":
        http_exporter = config["exporters"].pop("otlp_http")
        config["exporters"]["otlp_grpc"] = {**http_exporter, "endpoint": grpc_downstream.endpoint}
        backend = grpc_downstream
    gateway = await start_gateway(config)
    rng = random.Random(11)
    plan = [rng.choice(["error", "slow", "ok", "ok", "ok", "ok"]) for _ in range(240)]
    url = f"http://127.0.0.1:{port_of(gateway)}"  # the SDK's gRPC exporter reads http:// as plaintext
    traces = await asyncio.to_thread(send_sdk_traces, url, plan, GRPCSpanExporter)
    kept = expected_keeps(traces)
    await drained(gateway, len(traces))
    await wait_for(lambda: metric(gateway, "tailgate_exporter_queue_spans", exporter=exporter) == 0)

    assert metric(gateway, "tailgate_exporter_sent_spans_total", exporter=exporter) == 4 * len(kept)
    assert set(backend.spans_by_trace()) == kept
    assert any(traces[trace_id][0] == "ok" for trace_id in kept)
    keeping_policy = {"error": "errors", "slow": "slow", "ok": "sample10"}
    assert backend.kept_by() == {trace_id: {keeping_policy[traces[trace_id][0]]} for trace_id in kept}
    for spans in backend.spans_by_trace().values():
        assert len({span.span_id for span in spans}) == len(spans) == 4, "complete, each span once"
    assert metric(gateway, "tailgate_receiver_spans_total", **ACCEPTED) == 4 * len(traces)
    assert metric(gateway, REQUESTS, protocol="otlp_grpc") >= 2  # one call per service at least
    if exporter == "otlp_grpc":
        assert grpc_downstream.calls and all(call.compressed for call in grpc_downstream.calls)


async def test_malformed_message_is_invalid_argument(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(grpc_gateway_config(downstream))
    error = await export_error(port_of(gateway), b"\x0a\xff\xff\x00garbage")
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed protobuf" in error.details()
    assert metric(gateway, REFUSED, protocol="otlp_grpc", reason="malformed") == 1
    await assert_still_serving(port_of(gateway), downstream)
    assert metric(gateway, REQUESTS, protocol="otlp_grpc") == 2


async def test_invalid_ids_rejected_in_partial_success(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(grpc_gateway_config(downstream))
    request = make_request(traces=2, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    # A short trace id, an all-zero span id, a short parent id: three spans of the first trace.
    spans[0].trace_id, spans[1].span_id, spans[2].parent_span_id = b"\x01" * 8, bytes(8), b"\x01" * 4
    reply = await export(port_of(gateway), request.SerializeToString())
    partial = ExportTraceServiceResponse.FromString(reply).partial_success
    assert partial.rejected_spans == 3
    for kind in ("trace id", "span id", "parent span id"):
        assert f"invalid {kind}" in partial.error_message
    await wait_for(lambda: set(downstream.spans_by_trace()) == {spans[3].trace_id})
    assert len(downstream.spans_by_trace()[spans[3].trace_id]) == 3
    rejected = {"protocol": "otlp_grpc", "outcome": "rejected"}
    assert metric(gateway, "tailgate_receiver_spans_total", **rejected) == 3
    assert metric(gateway, "tailgate_receiver_spans_total", **ACCEPTED) == 3
    await assert_still_serving(port_of(gateway), downstream)


async def test_gzip_compressed_call_accepted(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(grpc_gateway_config(downstream))
    request = make_request(traces=3, spans_per_trace=2)
    assert await export(port_of(gateway), request.SerializeToString(), grpc.Compression.Gzip) == b""
    await wait_for(lambda: len(downstream.spans()) == 6)
    assert metric(gateway, "tailgate_receiver_spans_total", **ACCEPTED) == 6


async def test_message_over_limit_is_resource_exhausted(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = grpc_gateway_config(downstream)
    config["receivers"]["otlp"]["grpc"]["max_request_bytes"] = 10_000
    gateway = await start_gateway(config)
    big = make_request(traces=100, spans_per_trace=5).SerializeToString()
    assert len(big) > 10_000
    error = await export_error(port_of(gateway), big)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    # A gzip bomb: a few KiB on the wire, far over the limit once decompressed (grpc stops inflating there).
    bomb = b"\x0a\x00" * 2_500_000  # empty ResourceSpans, valid protobuf
    assert len(gzip.compress(bomb)) < 10_000
    error = await export_error(port_of(gateway), bomb, grpc.Compression.Gzip)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Decompressed message larger than max" in error.details()
    # grpc answers both before a message reaches tailgate: they are not counted.
    assert metric(gateway, REQUESTS, protocol="otlp_grpc") == 0
    await assert_still_serving(port_of(gateway), downstream)


async def test_port_taken_is_a_start_error_naming_the_endpoint(downstream: Downstream) -> None:
    with socket.socket() as taken:
        # SO_REUSEPORT on both sides would let the kernel share the port; tailgate does not ask for it.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        config = grpc_gateway_config(downstream)
        config["receivers"]["otlp"]["grpc"]["endpoint"] = endpoint
        gateway = Gateway(parse_config(config))
        try:
            with pytest.raises(OSError, match=f"cannot listen on {endpoint}"):
                await gateway.start()
        finally:
            await gateway.stop()


async def test_call_during_shutdown_gets_unavailable_with_retry_info(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = grpc_gateway_config(downstream, decision_wait="60s", decision_wait_after_root_received="60s")
    gateway = await start_gateway({**config, "shutdown_timeout": "4s"})  # calls in progress get 1 s
    port = port_of(gateway)
    buffered = make_request(traces=3, spans_per_trace=2)
    await export(port, buffered.SerializeToString())
    in_progress = make_request(traces=2, spans_per_trace=2)
    go = asyncio.Event()

    async def message_after_go() -> AsyncIterator[bytes]:
        await go.wait()
        yield in_progress.SerializeToString()

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.stream_unary(EXPORT)(message_after_go(), timeout=5)
        await wait_for(lambda: gateway.receivers[0]._in_flight == 1)  # type: ignore[attr-defined]
        stopping = asyncio.create_task(gateway.stop())
        await wait_for(lambda: not gateway.ready)

        error = await export_error(port, make_request(traces=1, spans_per_trace=1).SerializeToString())
        assert error.code() is grpc.StatusCode.UNAVAILABLE
        status = Status.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])
        assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
        retry_info = RetryInfo()
        assert status.details[0].Unpack(retry_info)
        assert retry_info.retry_delay.ToTimedelta().total_seconds() == 1.0
        go.set()  # the call in progress completes during shutdown
        assert await call == b""
        await stopping

    assert len(downstream.spans()) == 10
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="shutdown") == 5
    assert metric(gateway, REFUSED, protocol="otlp_grpc", reason="shutting_down") == 1
    error = await export_error(port, buffered.SerializeToString())
    assert error.code() is grpc.StatusCode.UNAVAILABLE  # nobody listens any more
