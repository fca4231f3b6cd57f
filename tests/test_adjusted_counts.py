"""Adjusted counts on kept spans: the tracestate `ot=th:` threshold and `tailgate.sample_rate` = 1/p."""

from __future__ import annotations

import gzip
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.adjusted import encode, head_probability, with_threshold
from sampler.otlp_wire import TAG_RESOURCE_SPANS, TAG_SCOPE_SPANS, TAG_SPANS, iter_fields
from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import send

RATE = "tailgate.sample_rate"
# encode(0.1) at full precision: 2^56 − round(0.1 × 2^56), 14 hex digits, trailing zeros dropped.
TH_10_PERCENT = "e6666666666666"


def probabilistic(percentage: float) -> list[dict[str, Any]]:
    return [{"name": "sample", "type": "probabilistic", "probabilistic": {"sampling_percentage": percentage}}]


def reference_th(probability: float) -> str:
    """The `th` value of a probability as the OTel specification computes it, independently."""
    threshold = (1 << 56) - round(probability * (1 << 56))
    return "0" if threshold == 0 else f"{threshold:014x}".rstrip("0")


class RawDownstream(Downstream):
    """The conftest downstream that also keeps each request body as it arrived (decompressed)."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(
            gzip.decompress(body) if request.headers.get("Content-Encoding") == "gzip" else body
        )
        return await super()._handle(request)

    def span_payloads(self) -> list[bytes]:
        """Each span's bytes exactly as the gateway put them on the wire."""
        payloads = []
        for body in self.bodies:
            for _, rs_start, rs_end in _fields(body, 0, len(body), TAG_RESOURCE_SPANS):
                for _, ss_start, ss_end in _fields(body, rs_start, rs_end, TAG_SCOPE_SPANS):
                    payloads += [body[s:e] for _, s, e in _fields(body, ss_start, ss_end, TAG_SPANS)]
        return payloads


def _fields(buf: bytes, start: int, end: int, tag: int) -> list[tuple[int, int, int]]:
    return [field for field in iter_fields(buf, start, end) if field[0] == tag]


@pytest.fixture
async def raw_downstream() -> AsyncIterator[RawDownstream]:
    server = RawDownstream()
    await server.start()
    yield server
    await server.stop()


def make_traces(
    rng: random.Random, traces: int, spans_per_trace: int, trace_state: str = ""
) -> ExportTraceServiceRequest:
    """Traces of a root and children, every span with `trace_state`; ids from `rng`."""
    request = ExportTraceServiceRequest()
    scope_spans = request.resource_spans.add().scope_spans.add()
    scope_spans.scope.name = "tests"
    for _ in range(traces):
        trace_id = rng.randbytes(16)
        root_id = rng.randbytes(8)
        for index in range(spans_per_trace):
            span = scope_spans.spans.add(trace_id=trace_id, name=f"op{index}", trace_state=trace_state)
            span.span_id = root_id if index == 0 else rng.randbytes(8)
            if index:
                span.parent_span_id = root_id
            span.start_time_unix_nano = 1_700_000_000_000_000_000
            span.end_time_unix_nano = span.start_time_unix_nano + 1_000_000
    return request


def spans_of(request: ExportTraceServiceRequest) -> list[Span]:
    return [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]


def rates(span: Span) -> list[float]:
    return [kv.value.double_value for kv in span.attributes if kv.key == RATE]


def th_of(trace_state: str) -> str:
    (ot,) = [member for member in trace_state.split(",") if member.startswith("ot=")]
    (th,) = [field[3:] for field in ot[3:].split(";") if field.startswith("th:")]
    return th


def adjusting(downstream: Downstream, policies: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A test gateway's config with adjusted counts on (tests/conftest.py turns them off)."""
    sampling: dict[str, Any] = {"adjusted_counts": True}
    if policies is not None:
        sampling["policies"] = policies
    return gateway_config(downstream, **sampling)


async def settled(gateway: Any, downstream: Downstream, traces: int) -> None:
    """Wait until `traces` traces are decided and every span of the kept ones has arrived."""
    await wait_for(
        lambda: (
            metric(gateway, "tailgate_traces_decided_total", decision="kept")
            + metric(gateway, "tailgate_traces_decided_total", decision="dropped")
            >= traces
        )
    )
    await wait_for(
        lambda: len(downstream.spans()) == metric(gateway, "tailgate_spans_decided_total", decision="kept")
    )


def test_thresholds_follow_the_specification() -> None:
    assert encode(1.0) == "0"
    assert encode(0.5) == "8"
    assert encode(0.25) == "c"
    assert encode(0.1) == TH_10_PERCENT == reference_th(0.1)
    assert encode(0.01) == reference_th(0.01)
    assert encode(1 - 2**-52) == "0000000000001"  # threshold 0x10: the leading zeros stay
    assert head_probability("ot=th:c") == 0.25
    assert head_probability("vendor=x, ot=rv:abcdef01234567;th:8") == 0.5
    for invalid in ("ot=th:", "ot=th:0123456789abcde", "ot=th:xyz", "ot=rv:00", "", "other=th:8"):
        assert head_probability(invalid) == 1.0
    assert with_threshold("a=1, ot=rv:ab;th:8;x:y ,b=2", "c") == "ot=th:c;rv:ab;x:y,a=1,b=2"
    many = ",".join(f"k{n}=v" for n in range(32))
    assert with_threshold(many, "0").split(",")[-1] == "k30=v"  # at most 32 members


async def test_probabilistic_sample_rates_estimate_the_trace_count(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(adjusting(downstream, probabilistic(10)))
    rng = random.Random(1)
    traces = 4000
    for _ in range(8):
        await send(receiver_url(gateway), make_traces(rng, traces // 8, 2))
    await settled(gateway, downstream, traces)

    spans = [span for _, _, span in downstream.spans()]
    roots = [span for span in spans if not span.parent_span_id]
    assert 300 < len(roots) < 500
    # Each kept root stands for 1/p traces: the sum estimates how many traces there were.
    estimate = sum(rate for span in roots for rate in rates(span))
    assert abs(estimate - traces) <= 0.15 * traces
    for span in spans:
        assert rates(span) == [10.0]
        assert span.trace_state == f"ot=th:{TH_10_PERCENT}"


async def test_head_threshold_multiplies_and_other_members_are_kept(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(adjusting(downstream, probabilistic(10)))
    head = "congo=t61rcWkgMzE, ot=rv:0123456789abcd;th:8"  # p_head = 0.5
    await send(receiver_url(gateway), make_traces(random.Random(2), 400, 2, head))
    await settled(gateway, downstream, 400)

    spans = [span for _, _, span in downstream.spans()]
    assert spans
    for span in spans:
        assert span.trace_state == f"ot=th:{reference_th(0.05)};rv:0123456789abcd,congo=t61rcWkgMzE"
        assert rates(span) == [pytest.approx(20.0)]


async def test_always_kept_traces_have_rate_one(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(adjusting(downstream))
    rng = random.Random(3)
    request = make_traces(rng, 1, 2)
    request.MergeFrom(make_traces(rng, 1, 2, "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"))
    request.MergeFrom(make_traces(rng, 1, 2, "congo=x,ot=rv:0123456789abcd;foo:bar,rojo=y"))
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(downstream.spans()) == 6)

    states = {span.trace_state for _, _, span in downstream.spans()}
    assert states == {
        "ot=th:0",
        "ot=th:0,congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
        "ot=th:0;rv:0123456789abcd;foo:bar,congo=x,rojo=y",
    }
    assert all(rates(span) == [1.0] for _, _, span in downstream.spans())


async def test_late_spans_carry_their_traces_values(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(adjusting(downstream, probabilistic(50)))
    rng = random.Random(4)
    request = make_traces(rng, 60, 2)
    await send(receiver_url(gateway), request)
    await settled(gateway, downstream, 60)
    kept = {span.trace_id for _, _, span in downstream.spans()}
    assert 0 < len(kept) < 60

    late = ExportTraceServiceRequest()
    late_spans = late.resource_spans.add().scope_spans.add()
    for trace_id in {span.trace_id for span in spans_of(request)}:
        span = late_spans.spans.add(trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=b"\x01" * 8)
        span.name = "late"
        span.trace_state = "ot=th:8"  # the late span's own head probability, 0.5
    await send(receiver_url(gateway), late)
    await wait_for(lambda: metric(gateway, "tailgate_late_spans_total", decision="kept") == len(kept))
    await wait_for(lambda: len([s for _, _, s in downstream.spans() if s.name == "late"]) == len(kept))

    for _, _, span in downstream.spans():
        if span.name == "late":
            assert span.trace_id in kept
            assert span.trace_state == "ot=th:c"  # 0.5 × 0.5
            assert rates(span) == [4.0]
        else:
            assert span.trace_state == "ot=th:8"
            assert rates(span) == [2.0]


async def test_a_second_tier_replaces_the_sample_rate(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(adjusting(downstream))
    request = make_traces(random.Random(5), 1, 2, "ot=th:c")
    for span in spans_of(request):
        span.attributes.extend(
            [
                KeyValue(key="before", value=AnyValue(int_value=1)),
                KeyValue(key=RATE, value=AnyValue(double_value=8.0)),
                KeyValue(key="after", value=AnyValue(int_value=2)),
            ]
        )
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(downstream.spans()) == 2)

    for _, _, span in downstream.spans():
        assert [kv.key for kv in span.attributes] == ["before", "after", RATE]
        assert rates(span) == [4.0]
        assert span.trace_state == "ot=th:c"


@pytest.mark.parametrize("adjusted_counts", [False, True])
async def test_spans_on_the_wire(
    start_gateway: GatewayFactory, raw_downstream: RawDownstream, adjusted_counts: bool
) -> None:
    config = gateway_config(raw_downstream, adjusted_counts=adjusted_counts)
    gateway = await start_gateway(config)
    request = make_traces(random.Random(6), 5, 3, "vendor=abc")
    await send(receiver_url(gateway), request)
    await wait_for(lambda: len(raw_downstream.spans()) == 15)

    sent = {span.SerializeToString() for span in spans_of(request)}
    received = raw_downstream.span_payloads()
    if not adjusted_counts:
        # Off: each span leaves byte for byte as it arrived.
        assert set(received) == sent
        return
    # On: the span's bytes as they arrived, then the appended trace_state and attribute.
    for payload in received:
        (original,) = [span for span in sent if payload.startswith(span)]
        appended = Span.FromString(payload[len(original) :])
        assert appended.trace_state == "ot=th:0,vendor=abc"
        assert rates(appended) == [1.0]
