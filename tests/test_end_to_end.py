"""The whole pipeline with the real OpenTelemetry SDK as client and a real OTLP/HTTP downstream."""

from __future__ import annotations

import asyncio
import gzip
import random
from fractions import Fraction
from math import floor
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import (
    Downstream,
    GatewayFactory,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.otlp_data import JSON, make_request, otlp_json, post, send_sdk_traces

TESTDATA = Path(__file__).resolve().parent / "data"  # copied from shared/testdata, see its README
POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 500}},
    {"name": "sample10", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
]


def fnv1a_64(data: bytes) -> int:
    value = 0xCBF29CE484222325
    for byte in data:
        value ^= byte
        value = (value * 0x100000001B3) % (1 << 64)
    return value


def probabilistic_keeps(trace_id: bytes, percentage: float, salt: str = "default-hash-seed") -> bool:
    threshold = floor(Fraction(percentage) / 100 * ((1 << 64) - 1))
    return fnv1a_64(salt.encode() + trace_id) <= threshold


def expected_keeps(traces: dict[bytes, tuple[str, int]]) -> set[bytes]:
    return {
        trace_id
        for trace_id, (kind, _) in traces.items()
        if kind in ("error", "slow") or probabilistic_keeps(trace_id, 10)
    }


async def drained(gateway: object, traces: int) -> None:
    await wait_for(
        lambda: (
            metric(gateway, "tailgate_traces_decided_total", decision="kept")  # type: ignore[arg-type]
            + metric(gateway, "tailgate_traces_decided_total", decision="dropped")  # type: ignore[arg-type]
            >= traces
        )
    )


async def test_sdk_traces_kept_exactly_by_policies(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=POLICIES))
    rng = random.Random(7)
    plan = [rng.choice(["error", "slow", "ok", "ok", "ok", "ok"]) for _ in range(240)]
    traces = await asyncio.to_thread(send_sdk_traces, receiver_url(gateway), plan)
    kept = expected_keeps(traces)
    kept_spans = sum(traces[t][1] for t in kept)
    await wait_for(lambda: len(downstream.spans()) >= kept_spans)
    await drained(gateway, len(traces))
    await asyncio.sleep(0.1)  # nothing more may arrive

    received = downstream.spans_by_trace()
    assert set(received) == kept
    assert any(traces[t][0] == "ok" for t in kept), "the probabilistic policy kept some plain traces"
    for trace_id, spans in received.items():
        span_ids = [span.span_id for span in spans]
        assert len(span_ids) == len(set(span_ids)) == 4, "complete, each span once"
        kind = traces[trace_id][0]
        expected = "errors" if kind == "error" else "slow" if kind == "slow" else "sample10"
        assert downstream.kept_by()[trace_id] == {expected}
    services = {
        kv.value.string_value
        for resource, _, _ in downstream.spans()
        for kv in resource.attributes
        if kv.key == "service.name"
    }
    assert services == {"frontend", "backend"}
    total = len(traces) * 4
    assert metric(gateway, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted") == total
    assert metric(gateway, "tailgate_spans_decided_total", decision="kept") == kept_spans
    assert metric(gateway, "tailgate_spans_decided_total", decision="dropped") == total - kept_spans
    assert metric(gateway, "tailgate_traces_decided_total", decision="kept") == len(kept)
    # Counted once the downstream's reply is read, a moment after it has the spans.
    await wait_for(
        lambda: metric(gateway, "tailgate_exporter_sent_spans_total", exporter="otlp_http") == kept_spans
    )
    errors = sum(1 for kind, _ in traces.values() if kind == "error")
    assert metric(gateway, "tailgate_policy_decisions_total", policy="errors", decision="sampled") == errors
    assert metric(gateway, "tailgate_buffered_spans") == 0


@pytest.mark.parametrize("compressed", [True, False], ids=["gzip", "plain"])
async def test_json_bodies_kept_exactly_by_policies(
    start_gateway: GatewayFactory, downstream: Downstream, compressed: bool
) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=POLICIES))
    request = make_request(traces=120, spans_per_trace=3, error_every=7)
    spans = request.resource_spans[0].scope_spans[0].spans
    for index in range(0, len(spans), 3 * 5):  # every fifth trace lasts 2 s
        spans[index].end_time_unix_nano = spans[index].start_time_unix_nano + 2_000_000_000
    errors = {span.trace_id for span in spans if span.status.code == 2}
    slow = {spans[index].trace_id for index in range(0, len(spans), 3 * 5)}
    kept = errors | slow | {span.trace_id for span in spans if probabilistic_keeps(span.trace_id, 10)}
    body = otlp_json(request)
    headers = {"Content-Type": "application/json"}
    if compressed:
        body, headers = gzip.compress(body), {**headers, "Content-Encoding": "gzip"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(receiver_url(gateway), data=body, headers=headers) as reply,
    ):
        assert reply.status == 200
        assert reply.content_type == "application/json"
        assert await reply.json() == {}
    await drained(gateway, 120)
    await wait_for(lambda: len(downstream.spans()) >= 3 * len(kept))
    await asyncio.sleep(0.1)  # nothing more may arrive
    received = downstream.spans_by_trace()
    assert set(received) == kept
    assert all(len(spans) == 3 for spans in received.values())
    assert any(trace_id not in errors | slow for trace_id in kept)


async def test_official_json_example_accepted(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=POLICIES[:1]))
    status, _, _ = await post(receiver_url(gateway), (TESTDATA / "otlp" / "trace.json").read_bytes(), JSON)
    assert status == 200
    # No error span: decided (after decision_wait, as it has no root) and dropped.
    await drained(gateway, 1)
    assert metric(gateway, "tailgate_spans_decided_total", decision="dropped") == 1
    assert not downstream.requests


async def test_shared_example_kept_field_by_field(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    status, _, _ = await post(receiver_url(gateway), (TESTDATA / "otlp" / "trace.json").read_bytes(), JSON)
    assert status == 200
    await wait_for(lambda: len(downstream.spans()) == 1)
    resource, scope, span = downstream.spans()[0]
    assert span.trace_id.hex() == "5b8efff798038103d269b633813fc60c"
    assert span.span_id.hex() == "eee19b7ec3c1b174"
    assert span.parent_span_id.hex() == "eee19b7ec3c1b173"
    assert span.name == "I'm a server span"
    assert span.kind == 2
    assert span.start_time_unix_nano == 1544712660000000000
    assert span.end_time_unix_nano == 1544712661000000000
    attributes = {kv.key: kv.value.string_value for kv in span.attributes}
    assert attributes == {"my.span.attr": "some value"}
    assert resource.attributes[0].value.string_value == "my.service"
    assert (scope.name, scope.version) == ("my.library", "1.0.0")
    # The keeping policy is recorded where the OTel Collector puts it: on the instrumentation scope.
    assert {kv.key: kv.value.string_value for kv in scope.attributes} == {
        "my.scope.attribute": "some scope attribute",
        "tailsampling.policy": "all",
    }
