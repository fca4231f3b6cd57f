"""The memory monitor's state machine: stress relief on and off with hysteresis, hash decisions that match
`probabilistic`, late spans following them, shedding oldest first, the overload flag, when RSS counts.

A real buffer, decision cache and decider on a hand-moved clock; the exporter is a recorder whose fullness
the test sets, and the RSS reader is a value the test sets (the acceptance run, tests/test_overload.py,
has real ones).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

from policies.probabilistic import Probabilistic
from policies.registry import build_policies
from sampler.buffer import DecisionCache, Kept, TraceBuffer
from sampler.config import Config, parse_config
from sampler.decider import Decider
from sampler.errors import ConfigError
from sampler.exporters.base import Exporter
from sampler.metrics import Metrics
from sampler.otlp_wire import SpanGroup
from sampler.pressure import STRESS_POLICY, ExporterQueue, MemoryPressure
from sampler.receivers.common import Ingest
from sampler.receivers.otlp_decode import decode_protobuf
from sampler.simulate import SimulatedClock
from tests.otlp_data import make_request

MAX_MEMORY = 200_000


@dataclass
class RecordingExporter:
    """An exporter that keeps what it is given and reports itself full when the test says so."""

    name: str = "recorder"
    capacity: int = 1_000_000
    full: bool = False
    groups: list[SpanGroup] = field(default_factory=list)

    def export(self, groups: list[SpanGroup], span_count: int) -> None:
        self.groups.extend(groups)

    def is_full(self) -> bool:
        return self.full

    async def wait_for_room(self, span_count: int) -> None:
        """Never waits: the test says when it is full."""

    async def start(self) -> None:
        """Nothing to open."""

    async def shutdown(self, timeout: float) -> None:
        """Nothing to flush."""

    def trace_ids(self) -> set[bytes]:
        """Trace ids of every span exported."""
        return {
            span.trace_id for _, entries, _ in self.groups for span in ScopeSpans.FromString(entries).spans
        }

    def policies(self) -> set[str]:
        """The `tailsampling.policy` values on the scopes of everything exported."""
        return {
            kv.value.string_value
            for scope, _, _ in self.groups
            for kv in ScopeSpans.FromString(scope.scope).scope.attributes
            if kv.key == "tailsampling.policy"
        }


@dataclass
class Setup:
    pressure: MemoryPressure
    buffer: TraceBuffer
    decider: Decider
    ingest: Ingest
    exporter: RecordingExporter
    metrics: Metrics
    clock: SimulatedClock
    # Seeded: the same trace ids, so the same hash outcomes, on every run.
    rng: random.Random = field(default_factory=lambda: random.Random(1234))

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def send(self, trace_ids: list[bytes], spans_per_trace: int = 4) -> None:
        """Buffer one request with these traces (root and children, padded), as a receiver does."""
        request = request_for(trace_ids, spans_per_trace)
        self.ingest.add(decode_protobuf(request.SerializeToString()))

    def send_new(self, traces: int) -> list[bytes]:
        ids = [self.rng.randbytes(16) for _ in range(traces)]
        self.send(ids)
        return ids

    def fill_to(self, level: float) -> list[bytes]:
        """Send new traces, a few per request, until the estimate reaches `level` bytes."""
        ids: list[bytes] = []
        while self.pressure.estimate() < level:
            ids += self.send_new(2)
        return ids

    def fill_until_stressed(self) -> None:
        """Send new traces, a few per request, until stress relief turns on."""
        while not self.pressure.stressed:
            self.send_new(2)


def config(sampling: dict[str, Any] | None = None, **relief: Any) -> Config:
    return parse_config(
        {
            "exporters": {"file": {"path": "unused.jsonl"}},
            "tail_sampling": {
                "decision_wait": "10s",
                "decision_wait_after_root_received": "10s",
                "adjusted_counts": False,
                "policies": [{"name": "all", "type": "always_sample"}],
                **(sampling or {}),
            },
            "memory": {"max_memory": MAX_MEMORY, "stress_relief": relief},
        }
    )


def build(sampling: dict[str, Any] | None = None, **relief: Any) -> Setup:
    settings = config(sampling, **relief)
    clock = SimulatedClock()
    metrics = Metrics()
    decisions = DecisionCache(10_000, 10_000)
    buffer = TraceBuffer(settings.tail_sampling, frozenset(), decisions, clock)
    exporter = RecordingExporter()
    policies = build_policies(settings.tail_sampling.policies, "tail_sampling.policies")
    decider = Decider(buffer, policies, [exporter], decisions, metrics, clock, 0.05, True)
    buffer.connect(decider.decide_safely, decider.forward_late)
    pressure = MemoryPressure(settings, buffer, [exporter], decisions, metrics, clock, rss=lambda: 0)
    ingest = Ingest("otlp_http", buffer, metrics, decider.count_late)
    ingest.pressure = pressure
    return Setup(pressure, buffer, decider, ingest, exporter, metrics, clock)


def request_for(trace_ids: list[bytes], spans_per_trace: int) -> ExportTraceServiceRequest:
    """A request with these traces, each a root and children with 100 bytes of attribute per span."""
    request = make_request(len(trace_ids), spans_per_trace)
    padding = KeyValue(key="pad", value=AnyValue(string_value="x" * 100))
    for index, span in enumerate(request.resource_spans[0].scope_spans[0].spans):
        span.trace_id = trace_ids[index // spans_per_trace]
        span.attributes.append(padding)
    return request


def decide_due(setup: Setup, traces: int) -> None:
    """Let `traces` buffered traces reach their deadline and be decided, as the decider's tick would."""
    setup.clock.now += 60
    setup.decider.decide(setup.buffer.pop_due(setup.clock.now, traces))


def test_stress_relief_turns_on_at_activation_and_off_only_below_deactivation() -> None:
    setup = build(activation_level=80, deactivation_level=50)
    setup.exporter.full = True  # nothing is shed, so the test moves the estimate itself
    pressure = setup.pressure
    while pressure.estimate() < pressure.activate_at:
        assert not pressure.stressed
        setup.send_new(2)
    assert pressure.stressed
    assert setup.metric("tailgate_stress_relief_active") == 1
    assert setup.metric("tailgate_stress_relief_activations_total") == 1

    # Between the levels it stays on, however long; below deactivation it turns off.
    while pressure.estimate() >= pressure.deactivate_at:
        assert pressure.stressed
        decide_due(setup, 1)
        pressure.update()
    assert not pressure.stressed
    assert setup.metric("tailgate_stress_relief_active") == 0

    # Back between the levels from below: still off.
    while pressure.estimate() < pressure.deactivate_at + (pressure.activate_at - pressure.deactivate_at) / 2:
        setup.send_new(1)
    assert not pressure.stressed
    setup.fill_to(pressure.activate_at)
    assert pressure.stressed
    assert setup.metric("tailgate_stress_relief_activations_total") == 2


def test_new_traces_under_stress_are_decided_at_once_by_the_probabilistic_hash() -> None:
    setup = build(sample_percentage=30)
    setup.fill_until_stressed()
    exported_before = setup.exporter.trace_ids()

    new = setup.send_new(300)

    assert not set(new) & set(setup.buffer.traces)  # none buffered
    (reference,) = build_policies(
        [{"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": 30}}], "p"
    )
    assert isinstance(reference, Probabilistic)
    expected = {t for t in new if reference.hash_trace_id(t) <= reference.threshold}
    assert 60 < len(expected) < 120  # about 30 %: the test sees both outcomes
    assert setup.exporter.trace_ids() - exported_before == expected
    for trace_id in new:
        decided = setup.buffer.decisions.lookup(trace_id)
        assert decided == (Kept(STRESS_POLICY, 1.0) if trace_id in expected else False)
    assert setup.metric("tailgate_stress_relief_traces_total", decision="kept") == len(expected)
    assert setup.metric("tailgate_stress_relief_traces_total", decision="dropped") == 300 - len(expected)
    assert STRESS_POLICY in setup.exporter.policies()


def longest_value(groups: list[SpanGroup]) -> int:
    return max(
        len(kv.value.string_value)
        for _, entries, _ in groups
        for span in ScopeSpans.FromString(entries).spans
        for kv in span.attributes
    )


def test_traces_kept_under_stress_follow_the_attribute_limits_and_adjusted_counts_also_reloaded() -> None:
    limits = {"attribute_limits": {"max_attribute_value_length": 10}}
    setup = build(limits, sample_percentage=100)
    setup.fill_until_stressed()
    exported = len(setup.exporter.groups)
    setup.send_new(5)
    assert longest_value(setup.exporter.groups[exported:]) == 10  # the padding of 100, cut

    # A reload without limits, with adjusted counts: stress relief follows it as the main decider does.
    reloaded = config({"adjusted_counts": True}, sample_percentage=100).tail_sampling
    setup.decider.reconfigure(setup.decider.policies, reloaded)
    setup.pressure.reconfigure(reloaded)
    exported = len(setup.exporter.groups)
    setup.send_new(5)
    groups = setup.exporter.groups[exported:]
    assert longest_value(groups) == 100
    spans = [span for _, entries, _ in groups for span in ScopeSpans.FromString(entries).spans]
    assert spans and all(span.trace_state.startswith("ot=th:") for span in spans)


def test_late_spans_of_stress_decided_traces_follow_their_decision() -> None:
    setup = build(sample_percentage=50)
    setup.fill_until_stressed()
    new = setup.send_new(100)
    kept = {t for t in new if setup.buffer.decisions.lookup(t)}
    # Stress relief ends; the traces' other spans arrive afterwards.
    decide_due(setup, len(setup.buffer.traces))
    setup.pressure.update()
    assert not setup.pressure.stressed
    exported_before = len(setup.exporter.groups)

    setup.send(new, spans_per_trace=2)

    assert not set(new) & set(setup.buffer.traces)
    late_groups = setup.exporter.groups[exported_before:]
    assert sum(count for _, _, count in late_groups) == 2 * len(kept)
    assert setup.metric("tailgate_late_spans_total", decision="kept") == 2 * len(kept)
    assert setup.metric("tailgate_late_spans_total", decision="dropped") == 2 * (100 - len(kept))


def test_buffered_traces_are_decided_early_oldest_first_down_to_the_activation_level() -> None:
    setup = build(activation_level=60, deactivation_level=30)
    pressure = setup.pressure
    oldest = setup.send_new(10)
    setup.fill_to(pressure.activate_at * 0.99)
    newest = setup.send_new(10)  # crosses the activation level

    assert pressure.stressed
    assert pressure.estimate() < pressure.activate_at
    shed = setup.metric("tailgate_traces_decided_early_total", reason="max_memory")
    assert shed > 0
    assert set(oldest) <= setup.exporter.trace_ids()  # kept by the policies (always_sample)
    assert set(newest) <= set(setup.buffer.traces)
    assert setup.metric("tailgate_stress_relief_traces_total", decision="kept") == 0


def test_while_an_exporter_is_full_nothing_is_shed_and_over_max_memory_requests_are_refused() -> None:
    setup = build()
    pressure = setup.pressure
    setup.exporter.full = True
    setup.fill_to(pressure.activate_at)
    assert pressure.stressed
    buffered = set(setup.buffer.traces)
    new = setup.fill_to(MAX_MEMORY)  # buffered, not decided: the kept ones would be refused
    assert set(new) <= set(setup.buffer.traces)
    assert buffered <= set(setup.buffer.traces)
    assert pressure.overloaded
    assert setup.metric("tailgate_memory_overloaded") == 1

    setup.exporter.full = False
    pressure.update()  # the monitor's timer, once the exporter has room again
    assert not pressure.overloaded
    assert pressure.estimate() < pressure.activate_at
    assert setup.metric("tailgate_traces_decided_early_total", reason="max_memory") > 0


def test_over_max_memory_with_room_downstream_is_not_overload() -> None:
    setup = build()
    setup.exporter.full = True
    setup.fill_to(MAX_MEMORY)
    assert setup.pressure.overloaded
    setup.exporter.full = False
    setup.send_new(1)
    assert not setup.pressure.overloaded


def test_rss_counts_only_from_the_deactivation_level_and_is_read_at_most_every_100ms() -> None:
    setup = build(activation_level=90, deactivation_level=50)
    pressure = setup.pressure
    reads = 0

    def rss() -> int:
        nonlocal reads
        reads += 1
        return 10 * MAX_MEMORY

    pressure.read_rss = rss
    setup.exporter.full = True
    setup.fill_to(pressure.deactivate_at * 0.9)
    assert not pressure.stressed
    assert reads == 0
    setup.fill_to(pressure.deactivate_at)  # RSS now counts, and is far over
    assert pressure.stressed
    assert pressure.overloaded
    for _ in range(20):
        setup.send_new(1)
    assert reads == 1  # the clock has not moved
    setup.clock.now += 0.1
    setup.send_new(1)
    assert reads == 2
    # Memory the allocator keeps does not hold stress relief on once the estimate is low.
    decide_due(setup, len(setup.buffer.traces))
    setup.exporter.full = False
    pressure.update()
    assert not pressure.stressed
    assert not pressure.overloaded


@pytest.mark.parametrize(
    ("memory", "message"),
    [
        ({"max_memory": 0}, "memory.max_memory: must be more than 0 bytes"),
        ({"max_memory": "lots"}, "memory.max_memory: could not parse value and unit"),
        (
            {"max_memory": "1GiB", "stress_relief": {"activation_level": 60, "deactivation_level": 70}},
            "memory.stress_relief: deactivation_level must not be above activation_level",
        ),
        ({"stress_relief": {"sample_percentage": 101}}, "memory.stress_relief.sample_percentage"),
    ],
)
def test_memory_settings_are_checked(memory: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"exporters": {"file": {"path": "x.jsonl"}}, "memory": memory})


def test_max_memory_takes_sizes_with_units() -> None:
    settings = parse_config({"exporters": {"file": {"path": "x.jsonl"}}, "memory": {"max_memory": "64MiB"}})
    assert settings.memory.max_memory == 64 * 1024 * 1024


@dataclass
class ExporterWithoutIsFull:
    """An exporter with BatchingExporter's span count but no `is_full()`."""

    name: str = "older"
    capacity: int = 1000
    _pending_spans: int = 0


def test_an_exporter_without_is_full_counts_as_full_within_5_percent_of_its_capacity() -> None:
    exporter = ExporterWithoutIsFull()
    queue = ExporterQueue(cast(Exporter, exporter), in_memory=True)
    exporter._pending_spans = 949
    assert not queue.is_full()
    exporter._pending_spans = 950
    assert queue.is_full()
    assert queue.queued_spans() == 950
