"""What the decider hands on: whole traces to exporters, and span counts that add up."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from policies.base import Decision, TraceView
from policies.registry import build_policies
from sampler.buffer import DecisionCache, Kept, TraceBuffer
from sampler.config import TailSamplingConfig
from sampler.decider import Decider
from sampler.metrics import Metrics
from sampler.receivers.otlp_decode import decode_protobuf
from sampler.simulate import SimulatedClock
from tests.conftest import Downstream, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import PROTOBUF, make_request, post, send
from tests.test_pressure import RecordingExporter, request_for


def request_spans(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


async def test_exporter_batches_hold_whole_traces_up_to_send_batch_size(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream)
    config["exporters"]["otlp_http"]["batch"] = {"timeout": "0.02s", "send_batch_size": 10}
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=50, spans_per_trace=4))
    await wait_for(lambda: len(downstream.spans()) == 200)
    # Decided together, handed over trace by trace: a batch closes at the trace that reaches 10 spans.
    assert max(request_spans(request) for request in downstream.requests) <= 12
    assert all(len(spans) == 4 for spans in downstream.spans_by_trace().values())


async def test_exporter_queue_bounds_traces_not_decision_batches(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream)
    config["exporters"]["otlp_http"]["batch"] = {"timeout": "0.02s", "queue_size": 100}
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=50, spans_per_trace=4))
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 50)
    await asyncio.sleep(0.3)
    # 25 whole traces fit the empty queue; the rest are refused and counted.
    assert len(downstream.spans()) == 100
    assert metric(gateway, "tailgate_exporter_dropped_spans_total", exporter="otlp_http") == 100


def _with_invalid_name(request: ExportTraceServiceRequest, index: int) -> bytes:
    request.resource_spans[0].scope_spans[0].spans[index].name = "PLACEHOLDER"
    return request.SerializeToString().replace(
        b"PLACEHOLDER", b"\xff\xfe\xfd\xfc\xff\xfe\xfd\xfc\xff\xfe\xfd"
    )


async def test_span_counts_add_up_with_invalid_spans(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream))
    url = receiver_url(gateway)
    request = make_request(traces=1, spans_per_trace=4)
    late = make_request(traces=1, spans_per_trace=1)
    late_span = late.resource_spans[0].scope_spans[0].spans[0]
    late_span.trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    late_span.parent_span_id = b"\x01" * 8
    assert (await post(url, _with_invalid_name(request, 2), PROTOBUF))[0] == 200
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 1)
    assert (await post(url, _with_invalid_name(late, 0), PROTOBUF))[0] == 200
    accepted = metric(gateway, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted")
    decided = metric(gateway, "tailgate_spans_decided_total", decision="kept")
    late_kept = metric(gateway, "tailgate_late_spans_total", decision="kept")
    assert (accepted, decided, late_kept) == (5, 4, 1)
    assert metric(gateway, "tailgate_invalid_spans_total") == 2  # of those, not forwarded
    await wait_for(lambda: len(downstream.spans()) == 3)


class Fixed:
    """A policy with one verdict for every trace, counting its calls; with None it raises (a faulty
    plugin)."""

    attribute_keys: frozenset[str] = frozenset()

    def __init__(self, name: str, verdict: Decision | None) -> None:
        self.name = name
        self.verdict = verdict
        self.calls = 0

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        self.calls += 1
        if self.verdict is None:
            raise RuntimeError("a bug in a plugin")
        return self.verdict


@pytest.mark.parametrize("first_match", [True, False], ids=["first-match", "all"])
@pytest.mark.parametrize("first", [Decision.NOT_SAMPLED, None], ids=["first-works", "first-fails"])
def test_a_failing_policy_changes_neither_the_order_nor_how_often_the_others_are_evaluated(
    first: Decision | None, first_match: bool
) -> None:
    """A failing policy counts as no verdict; the others are evaluated once each, in the same order and
    with the same early ends as without it: with sample_on_first_match a later policy is not evaluated
    (it would drop this trace), and no policy sees a trace twice (a rate limit would pay twice)."""
    policies = [
        Fixed("flaky", first),
        Fixed("keep-all", Decision.SAMPLED),
        Fixed("inverted", Decision.INVERT_NOT_SAMPLED),
    ]
    clock = SimulatedClock()
    decisions = DecisionCache(10, 10)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, clock)
    exporter = RecordingExporter()
    metrics = Metrics()
    decider = Decider(
        buffer, policies, [exporter], decisions, metrics, clock, 0.05, True, sample_on_first_match=first_match
    )
    buffer.connect(decider.decide_safely, decider.forward_late)
    buffer.add_spans(decode_protobuf(request_for([b"\x07" * 16], 2).SerializeToString()))
    clock.now += 100
    decider.decide(buffer.pop_due(clock.now, 10))
    # With every policy evaluated, the inverted one's INVERT_NOT_SAMPLED drops the trace.
    assert sum(count for _, _, count in exporter.groups) == (2 if first_match else 0)
    assert [policy.calls for policy in policies] == ([1, 1, 0] if first_match else [1, 1, 1])
    errors = metrics.registry.get_sample_value(
        "tailgate_policy_decisions_total", {"policy": "flaky", "decision": "error"}
    )
    assert errors == (1 if first is None else None)


def test_traces_buffered_at_a_reload_adding_keys_are_let_go_once_they_must_have_left() -> None:
    """A reload that adds attribute keys remembers the traces buffered then, to read the new keys from
    their spans when they are decided; one handed to another member meanwhile is never decided here,
    and is not held (with its spans) beyond the decision wait."""
    clock = SimulatedClock()
    decisions = DecisionCache(10, 10)
    settings = TailSamplingConfig(decision_wait=5.0)
    buffer = TraceBuffer(settings, frozenset(), decisions, clock)
    exporter = RecordingExporter()
    keep_all = Fixed("keep-all", Decision.SAMPLED)
    decider = Decider(buffer, [keep_all], [exporter], decisions, Metrics(), clock, 0.05, True)
    buffer.connect(decider.decide_safely, decider.forward_late)
    buffer.add_spans(decode_protobuf(request_for([b"\x07" * 16, b"\x08" * 16], 2).SerializeToString()))
    reading = Reading("reading", Decision.SAMPLED)
    reading.attribute_keys = frozenset({"pad"})
    decider.reconfigure([reading], settings)
    handed_over = buffer.take([buffer.traces[b"\x08" * 16]])  # as a cluster member hands a trace over
    clock.now += 6.5
    decider.decide(buffer.pop_due(clock.now, 10))
    assert not decider._stale_attributes
    assert handed_over[0] not in decider._stale_attributes
    assert sum(count for _, _, count in exporter.groups) == 2
    assert reading.seen == [["x" * 100]]  # the trace decided here got the added key from its spans


class Reading(Fixed):
    """A Fixed policy noting the values of its attribute key on each trace it evaluates."""

    def __init__(self, name: str, verdict: Decision | None) -> None:
        super().__init__(name, verdict)
        self.seen: list[list[object]] = []

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        self.seen += [list(trace.attribute_values(key)) for key in self.attribute_keys]
        return super().evaluate(trace, now)


@pytest.mark.parametrize("excluded", [True, False])
def test_a_trace_with_more_distinct_values_than_are_kept_is_decided_on_all_of_them(excluded: bool) -> None:
    """A buffered trace keeps a bounded number of distinct values per key; past it, all are read from
    its spans when it is decided, so the 300th route still counts."""
    (policy,) = build_policies(
        [
            {
                "name": "not-health",
                "type": "string_attribute",
                "string_attribute": {"key": "http.route", "values": ["/health"], "invert_match": True},
            }
        ],
        "tail_sampling.policies",
    )
    clock = SimulatedClock()
    decisions = DecisionCache(10, 10)
    buffer = TraceBuffer(TailSamplingConfig(), policy.attribute_keys, decisions, clock)
    exporter = RecordingExporter()
    decider = Decider(buffer, [policy], [exporter], decisions, Metrics(), clock, 0.05, True)
    buffer.connect(decider.decide_safely, decider.forward_late)
    routes = [f"/api/{n}" for n in range(299)] + ["/health" if excluded else "/api/last"]
    request = make_request(traces=1, spans_per_trace=len(routes))
    for span, route in zip(request.resource_spans[0].scope_spans[0].spans, routes, strict=True):
        span.attributes.add(key="http.route").value.string_value = route
    buffer.add_spans(decode_protobuf(request.SerializeToString()))
    (trace,) = buffer.traces.values()
    assert len(trace.attribute_values("http.route")) < 300  # bounded while buffered
    clock.now += 100
    decider.decide(buffer.pop_due(clock.now, 10))
    assert sum(count for _, _, count in exporter.groups) == (0 if excluded else 300)


def decide_one_batch(
    specs: list[dict[str, Any]], trace_ids: list[bytes], **options: Any
) -> tuple[DecisionCache, int]:
    """Decide `trace_ids` (2 spans each) with `specs` in one batch; the decision cache and spans exported."""
    policies = build_policies(specs, "tail_sampling.policies")
    clock = SimulatedClock()
    decisions = DecisionCache(100_000, 100_000)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, clock)
    exporter = RecordingExporter()
    decider = Decider(buffer, policies, [exporter], decisions, Metrics(), clock, 0.05, True, **options)
    buffer.connect(decider.decide_safely, decider.forward_late)
    buffer.add_spans(decode_protobuf(request_for(trace_ids, 2).SerializeToString()))
    clock.now += 100
    decider.decide(buffer.pop_due(clock.now, 100_000))
    return decisions, sum(count for _, _, count in exporter.groups)


def test_adjusted_count_is_one_when_a_certain_policy_also_sampled_the_trace() -> None:
    """Every trace is kept by always_sample (p = 1), so re-weighted counts must add up to the number of
    traces. The decider takes p from the first SAMPLED policy (decider.py `_keep`: the deciding index),
    here probabilistic 10 %, so the ~10 % it also sampled get sample_rate 10 and the estimate is ~1.9x.
    README "Adjusted counts": a span kept with p stands for 1/p spans; a trace any p = 1 policy keeps
    is kept with probability 1 whatever a probabilistic policy said about it."""
    rng = random.Random(7)
    trace_ids = [rng.randbytes(16) for _ in range(1000)]
    specs = [
        {"name": "baseline", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}},
        {"name": "everything", "type": "always_sample"},
    ]
    decisions, exported = decide_one_batch(specs, trace_ids)
    assert exported == 2 * len(trace_ids)
    kept = [decisions.lookup(trace_id) for trace_id in trace_ids]
    assert all(isinstance(k, Kept) for k in kept)
    # tailsampling.policy stays the Collector's: the first policy that said SAMPLED.
    assert {k.policy for k in kept if isinstance(k, Kept)} == {"baseline", "everything"}
    estimate = sum(1 / k.probability for k in kept if isinstance(k, Kept))
    assert estimate == len(trace_ids)


def test_rules_drop_still_drops_with_sample_on_first_match() -> None:
    """README (Policies, `rules`): its `drop` drops the trace whatever other policies say. The decider
    evaluates only `type: drop` policies first (decider.py `_is_drop`), so with sample_on_first_match an
    earlier SAMPLED ends the evaluation before the rules policy's DROPPED is seen and the trace is kept.
    (The Collector evaluates its drop policies first for this very reason.)"""
    specs = [
        {"name": "everything", "type": "always_sample"},
        {"name": "rules", "type": "rules", "rules": {"rules": [{"name": "drop-all", "action": "drop"}]}},
    ]
    _, all_evaluated = decide_one_batch(specs, [b"\x01" * 16])
    assert all_evaluated == 0
    _, first_match = decide_one_batch(specs, [b"\x01" * 16], sample_on_first_match=True)
    assert first_match == 0


def test_keep_probability_is_the_one_the_trace_was_decided_with_in_a_batch() -> None:
    """policies/base.py Weighted: the decider asks the keeping policy for p "once, right after the
    decision"; README: for ema_dynamic "1/rate of the trace's key when it was decided". decider.py
    `decide` evaluates the whole batch first and only then (`_keep`) asks keep_probability, so when a
    burst recomputes the rates mid-batch, traces decided before it are recorded with the new rate of
    their key (e.g. kept at rate 3, written as sample_rate 13)."""
    rng = random.Random(3)
    (policy,) = build_policies(
        [
            {
                "name": "ema",
                "type": "ema_dynamic",
                "ema_dynamic": {
                    "goal_sample_rate": 10,
                    "adjustment_interval": "10s",
                    "weight": 1,
                    "burst_multiple": 2,
                    "burst_detection_delay": 0,
                    "key_fields": ["status"],
                },
            }
        ],
        "tail_sampling.policies",
    )
    at_decision: dict[bytes, float] = {}
    evaluate = policy.evaluate

    def evaluate_and_note(trace: Any, now: float) -> Any:
        verdict = evaluate(trace, now)
        at_decision[trace.trace_id] = policy.keep_probability(trace)  # type: ignore[attr-defined]
        return verdict

    policy.evaluate = evaluate_and_note  # type: ignore[method-assign]
    clock = SimulatedClock()
    decisions = DecisionCache(100_000, 100_000)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, clock)
    decider = Decider(buffer, [policy], [RecordingExporter()], decisions, Metrics(), clock, 0.05, True)
    buffer.connect(decider.decide_safely, decider.forward_late)
    wrong: list[tuple[float, float]] = []
    # Two quiet intervals teach the rates (ERROR rare), then a burst of errors in one decision batch.
    for traces, errors in ((100, 10), (100, 10), (1000, 500)):
        trace_ids = [rng.randbytes(16) for _ in range(traces)]
        request = request_for(trace_ids, 1)
        for span in request.resource_spans[0].scope_spans[0].spans[:errors]:
            span.status.code = 2
        buffer.add_spans(decode_protobuf(request.SerializeToString()))
        clock.now += 100
        decider.decide(buffer.pop_due(clock.now, 100_000))
        for trace_id in trace_ids:
            kept = decisions.lookup(trace_id)
            if isinstance(kept, Kept) and kept.probability != at_decision[trace_id]:
                wrong.append((at_decision[trace_id], kept.probability))
    assert wrong == []


def test_a_first_match_by_a_rules_policy_evaluated_first_ends_the_evaluation() -> None:
    """A `rules` policy with a drop rule is evaluated first; under sample_on_first_match its keep is still
    the first match, and the rate_limiting policy after it is not asked (nor charged)."""
    never = {"field": "name", "operator": "=", "value": "no-such-span"}
    specs = [
        {
            "name": "rules",
            "type": "rules",
            "rules": {
                "rules": [
                    {"name": "never", "action": "drop", "conditions": [never]},
                    {"name": "all", "action": "keep"},
                ]
            },
        },
        {
            "name": "limit",
            "type": "rate_limiting",
            "rate_limiting": {"spans_per_second": 1, "burst_capacity": 4},
        },
    ]
    policies = build_policies(specs, "tail_sampling.policies")
    clock = SimulatedClock()
    decisions = DecisionCache(1000, 1000)
    buffer = TraceBuffer(TailSamplingConfig(), frozenset(), decisions, clock)
    decider = Decider(
        buffer,
        policies,
        [RecordingExporter()],
        decisions,
        Metrics(),
        clock,
        0.05,
        True,
        sample_on_first_match=True,
    )
    buffer.connect(decider.decide_safely, decider.forward_late)
    trace_ids = [bytes([number + 1]) * 16 for number in range(5)]
    buffer.add_spans(decode_protobuf(request_for(trace_ids, 2).SerializeToString()))
    clock.now += 100
    decider.decide(buffer.pop_due(clock.now, 1000))
    assert all(getattr(decisions.lookup(trace_id), "policy", None) == "rules" for trace_id in trace_ids)
    assert policies[1].bucket.tokens == 4  # type: ignore[attr-defined]
