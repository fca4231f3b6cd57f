"""`capture:` writes every received span, kept or not, as OTLP JSON lines before sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.config import parse_config
from sampler.errors import ConfigError
from sampler.receivers.otlp_decode import decode_json
from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import ERRORS_ONLY, JSON, make_request, otlp_json, post, send


def captured_spans(path: Path) -> list[tuple[str, Span]]:
    """Every span of the capture file with its service name, read as an OTLP JSON client would."""
    spans = []
    for line in path.read_bytes().splitlines():
        for batch in decode_json(line):
            request = ExportTraceServiceRequest()
            resource = request.resource_spans.add().resource
            resource.ParseFromString(batch.resource_payload)
            (service,) = [kv.value.string_value for kv in resource.attributes if kv.key == "service.name"]
            spans += [(service, Span.FromString(payload)) for payload in batch.payloads]
    return spans


async def test_every_received_span_is_captured_kept_or_not(
    start_gateway: GatewayFactory, downstream: Downstream, tmp_path: Path
) -> None:
    capture = tmp_path / "capture" / "spans.jsonl"
    config = gateway_config(downstream, policies=ERRORS_ONLY)
    config["capture"] = {"path": str(capture), "batch": {"timeout": "0.02s"}}
    gateway = await start_gateway(config)
    protobuf = make_request(traces=20, spans_per_trace=3, error_every=5)
    as_json = make_request(traces=10, spans_per_trace=2)
    await send(receiver_url(gateway), protobuf)
    status, _, _ = await post(receiver_url(gateway), otlp_json(as_json), JSON)
    assert status == 200
    await wait_for(lambda: metric(gateway, "tailgate_exporter_sent_spans_total", exporter="capture") == 80)
    await wait_for(lambda: len(downstream.spans()) == 12)  # the 4 error traces
    await gateway.stop()

    sent = [
        span for request in (protobuf, as_json) for span in request.resource_spans[0].scope_spans[0].spans
    ]
    captured = captured_spans(capture)
    assert sorted(span.SerializeToString() for _, span in captured) == sorted(
        span.SerializeToString() for span in sent
    )
    assert {service for service, _ in captured} == {"json-client"}
    # The capture is not sampled: nothing on it says which policy kept what.
    assert "tailsampling.policy" not in capture.read_text()
    assert all(json.loads(line)["resourceSpans"] for line in capture.read_text().splitlines())


def test_capture_needs_a_path() -> None:
    config = gateway_config(None)
    config["exporters"] = {"file": {"path": "out.jsonl"}}
    config["capture"] = {"batch": {"timeout": "1s"}}
    with pytest.raises(ConfigError, match=r"capture\.path: Field required"):
        parse_config(config)
