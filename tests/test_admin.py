"""The admin endpoint as an operator sees it: /metrics text matching what happened, /healthz, /readyz."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

import sampler
from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import ERRORS_ONLY, PROTOBUF, make_request


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as reply:
        assert reply.status == 200
        assert reply.content_type == "text/plain"
        text = await reply.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_endpoint_reports_what_happened(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=ERRORS_ONLY))
    assert gateway.admin.port is not None
    request = make_request(traces=10, spans_per_trace=3, error_every=5)  # traces 0 and 5 have errors
    async with aiohttp.ClientSession() as session:
        async with session.post(
            receiver_url(gateway), data=request.SerializeToString(), headers=PROTOBUF
        ) as reply:
            assert reply.status == 200
        async with session.post(receiver_url(gateway), data=b"junk", headers=PROTOBUF) as reply:
            assert reply.status == 400
    await wait_for(lambda: len(downstream.spans()) == 6)
    await wait_for(lambda: metric(gateway, "tailgate_exporter_sent_spans_total", exporter="otlp_http") == 6)
    samples = await scrape(gateway.admin.port)

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted") == 30
    assert value("tailgate_receiver_rejected_requests_total", protocol="otlp_http", reason="malformed") == 1
    assert value("tailgate_traces_decided_total", decision="kept") == 2
    assert value("tailgate_traces_decided_total", decision="dropped") == 8
    assert value("tailgate_spans_decided_total", decision="kept") == 6
    assert value("tailgate_spans_decided_total", decision="dropped") == 24
    assert value("tailgate_policy_decisions_total", policy="errors", decision="sampled") == 2
    assert value("tailgate_policy_decisions_total", policy="errors", decision="not_sampled") == 8
    assert value("tailgate_exporter_sent_spans_total", exporter="otlp_http") == 6
    assert value("tailgate_buffered_traces") == 0
    assert value("tailgate_buffered_spans") == 0
    assert value("tailgate_decision_delay_seconds_count") == 10
    assert value("tailgate_decision_delay_seconds_bucket", le="+Inf") == 10
    assert value("process_resident_memory_bytes") > 0
    assert value("tailgate_build_info", version=sampler.__version__) == 1


async def test_health_and_readiness(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    base = f"http://127.0.0.1:{gateway.admin.port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/healthz") as reply:
            assert reply.status == 200
        async with session.get(f"{base}/readyz") as reply:
            assert reply.status == 200
        gateway.ready = False  # as during shutdown, while the admin endpoint still answers
        async with session.get(f"{base}/readyz") as reply:
            assert reply.status == 503
        gateway.ready = True


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
async def test_metrics_pass_promtool(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gateway.admin.port}/metrics") as reply,
    ):
        text = await reply.read()
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_fan_out_to_every_exporter(
    start_gateway: GatewayFactory, downstream: Downstream, tmp_path: Path
) -> None:
    config = gateway_config(downstream)
    config["exporters"]["otlp_http/second"] = dict(config["exporters"]["otlp_http"])
    config["exporters"]["file"] = {"path": str(tmp_path / "kept.jsonl"), "batch": {"timeout": "0.02s"}}
    gateway = await start_gateway(config)
    request = make_request(traces=4, spans_per_trace=2)
    async with (
        aiohttp.ClientSession() as session,
        session.post(receiver_url(gateway), data=request.SerializeToString(), headers=PROTOBUF) as reply,
    ):
        assert reply.status == 200
    sent = {span.trace_id for span in request.resource_spans[0].scope_spans[0].spans}
    await wait_for(lambda: len(downstream.spans()) == 16)  # both OTLP exporters post to it
    assert all(len(spans) == 4 for spans in downstream.spans_by_trace().values())
    assert set(downstream.spans_by_trace()) == sent
    sink = tmp_path / "kept.jsonl"
    await wait_for(lambda: sink.exists() and sink.read_text().count("\n") >= 1)
    in_file = {
        bytes.fromhex(span["traceId"])
        for line in sink.read_text().splitlines()
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
        for span in scope_spans["spans"]
    }
    assert in_file == sent
