"""Prometheus metrics of one gateway, in a registry of its own so several gateways can share a process."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Sequence
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from sampler import __version__

DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FastHistogram(Collector):
    """A label-less histogram for hot paths: `observe` is a bisect and two adds, no lock.

    prometheus_client's Histogram takes a lock and walks every bucket per observation, which costs more
    than deciding a trace; tailgate observes once per decided trace, on the event loop thread only.
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: list[float]) -> None:
        bounds = self.bounds
        counts = self.counts
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1
        self.total += sum(values)

    def collect(self) -> Iterable[HistogramMetricFamily]:
        cumulative = []
        running = 0
        for bound, count in zip([*self.bounds, float("inf")], self.counts, strict=True):
            running += count
            label = "+Inf" if bound == float("inf") else repr(bound)
            cumulative.append((label, float(running)))
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], cumulative, sum_value=self.total)
        yield family

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return self.collect()


class CallbackCounters(Collector):
    """Counters read at scrape time from components that count in plain ints."""

    def __init__(self) -> None:
        self.counters: list[tuple[str, str, Callable[[], float]]] = []

    def add(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self.counters.append((name, documentation, read))

    def collect(self) -> Iterable[CounterMetricFamily]:
        for name, documentation, read in self.counters:
            yield CounterMetricFamily(name, documentation, value=read())


class Metrics:
    """Every metric tailgate exports; components receive this object and keep their label children."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # What operators expect beside tailgate's own: process RSS, CPU, open fds; Python version.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        build_info = Gauge("tailgate_build_info", "tailgate's version, as a label.", ["version"], registry=r)
        build_info.labels(__version__).set(1)
        self.received_spans = Counter(
            "tailgate_receiver_spans",
            "Spans received, by protocol and outcome (accepted, rejected).",
            ["protocol", "outcome"],
            registry=r,
        )
        self.received_requests = Counter(
            "tailgate_receiver_requests",
            "Requests (or gRPC calls) received, by protocol, whatever their outcome.",
            ["protocol"],
            registry=r,
        )
        self.rejected_requests = Counter(
            "tailgate_receiver_rejected_requests",
            "Requests refused with a 4xx/5xx reply, by protocol and reason "
            "(malformed, too_large, unsupported_media_type, unsupported_encoding, unauthenticated, ...).",
            ["protocol", "reason"],
            registry=r,
        )
        self.traces_decided = Counter(
            "tailgate_traces_decided",
            "Traces decided, by decision (kept, dropped).",
            ["decision"],
            registry=r,
        )
        self.spans_decided = Counter(
            "tailgate_spans_decided",
            "Spans of decided traces, by decision (kept, dropped); kept includes invalid spans left out.",
            ["decision"],
            registry=r,
        )
        self.early_decisions = Counter(
            "tailgate_traces_decided_early",
            "Traces decided before their deadline, by reason "
            "(max_spans_per_trace, num_traces, max_buffered_spans, max_memory, stress_relief, shutdown).",
            ["reason"],
            registry=r,
        )
        self.policy_decisions = Counter(
            "tailgate_policy_decisions",
            "Policy verdicts, by policy name and verdict.",
            ["policy", "decision"],
            registry=r,
        )
        self.late_spans = Counter(
            "tailgate_late_spans",
            "Spans that arrived after their trace was decided, by the decision they followed.",
            ["decision"],
            registry=r,
        )
        self.decision_errors = Counter(
            "tailgate_decision_errors",
            "Traces whose decision failed with an internal error (logged); their spans are lost.",
            registry=r,
        )
        self.invalid_spans = Counter(
            "tailgate_invalid_spans",
            "Spans of kept traces (or late spans of them) left out because they are not valid OTLP.",
            registry=r,
        )
        self.truncated_attributes = Counter(
            "tailgate_truncated_attributes",
            "Attributes of forwarded spans over tail_sampling.attribute_limits, by kind (dropped: left out "
            "over the count limit, shortened: a value cut to the length limit).",
            ["kind"],
            registry=r,
        )
        self.buffered_traces = Gauge("tailgate_buffered_traces", "Traces waiting for a decision.", registry=r)
        self.buffered_spans = Gauge(
            "tailgate_buffered_spans", "Spans waiting for their trace's decision.", registry=r
        )
        self.buffered_bytes = Gauge(
            "tailgate_buffered_bytes", "Serialized bytes of buffered spans.", registry=r
        )
        self.decision_delay = FastHistogram(
            "tailgate_decision_delay_seconds",
            "How long after its deadline a trace was decided.",
            DELAY_BUCKETS,
        )
        r.register(self.decision_delay)
        self.exported_spans = Counter(
            "tailgate_exporter_sent_spans",
            "Spans delivered downstream, by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_failed_spans = Counter(
            "tailgate_exporter_failed_spans",
            "Spans given up on after retries or a non-retryable reply, by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_dropped_spans = Counter(
            "tailgate_exporter_dropped_spans",
            "Spans refused because the exporter queue was full, by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_retries = Counter(
            "tailgate_exporter_retries",
            "Send attempts retried after a retryable failure, by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_queue_spans = Gauge(
            "tailgate_exporter_queue_spans",
            "Spans batched or in flight in an exporter, by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_queue_bytes = Gauge(
            "tailgate_exporter_queue_bytes",
            "Bytes of an exporter's disk queue (sending_queue.storage: disk), by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_queue_recovered_batches = Counter(
            "tailgate_exporter_queue_recovered_batches",
            "Batches found in an exporter's disk queue at start and queued again, by exporter.",
            ["exporter"],
            registry=r,
        )
        self.export_queue_corrupt_records = Counter(
            "tailgate_exporter_queue_corrupt_records",
            "Damaged or truncated records skipped in an exporter's disk queue, by exporter.",
            ["exporter"],
            registry=r,
        )
        # Memory pressure (`memory:`), see sampler/pressure.py.
        gauge = partial(Gauge, registry=r)
        self.memory_estimate = gauge(
            "tailgate_memory_estimate_bytes",
            "Estimated memory held by spans (buffered, and queued by exporters in memory), "
            "compared with memory.max_memory.",
        )
        self.memory_limit = gauge("tailgate_memory_limit_bytes", "memory.max_memory; 0 when not set.")
        self.memory_rss_growth = gauge(
            "tailgate_memory_rss_growth_bytes", "Resident memory above its level at start (with max_memory)."
        )
        self.memory_overloaded = gauge(
            "tailgate_memory_overloaded",
            "1 while receivers refuse new requests (over memory.max_memory, exporters full), else 0.",
        )
        self.stress_relief_active = gauge("tailgate_stress_relief_active", "1 while stress relief is on.")
        self.stress_relief_activations = Counter(
            "tailgate_stress_relief_activations", "Times stress relief turned on.", registry=r
        )
        self.stress_relief_traces = Counter(
            "tailgate_stress_relief_traces",
            "Traces decided at once by trace-id hash under stress relief, by decision (kept, dropped).",
            ["decision"],
            registry=r,
        )
        self.config_reloads = Counter(
            "tailgate_config_reloads",
            "Config reloads (SIGHUP, reload.watch), by result (applied, failed: the running config stays).",
            ["result"],
            registry=r,
        )
        self.config_last_reload_success = Gauge(
            "tailgate_config_last_reload_success",
            "1 if the last config load (start or reload) was applied, 0 if it failed.",
            registry=r,
        )
        self.config_last_reload_timestamp = Gauge(
            "tailgate_config_last_reload_timestamp_seconds",
            "Unix time of the last config load applied (start or reload).",
            registry=r,
        )

        # The write-ahead log (`durability: wal`), see sampler/wal.py.
        self.wal_bytes = gauge("tailgate_wal_bytes", "Bytes of write-ahead log segments on disk.")
        self.wal_replayed_spans = Counter(
            "tailgate_wal_replayed_spans",
            "Spans read back from the write-ahead log at start (not yet decided and exported before).",
            registry=r,
        )
        self.wal_corrupt_records = Counter(
            "tailgate_wal_corrupt_records",
            "Damaged or truncated records skipped in the write-ahead log at start.",
            registry=r,
        )
        self.wal_write_errors = Counter(
            "tailgate_wal_write_errors",
            "Failed writes (their requests were refused with 503) or fsyncs of the write-ahead log.",
            registry=r,
        )

        # Clusters and workers (`cluster:`, `workers:`), see sampler/cluster/.
        self.cluster_members = gauge("tailgate_cluster_members", "Members in this member's view of the ring.")
        self.cluster_pending_spans = gauge(
            "tailgate_cluster_forward_queue_spans", "Spans queued or in flight to other members."
        )
        self.cluster_forwarded_spans = Counter(
            "tailgate_cluster_forwarded_spans",
            "Spans of traces another member owns, queued for it, by member.",
            ["peer"],
            registry=r,
        )
        self.cluster_forward_refused_spans = Counter(
            "tailgate_cluster_forward_refused_spans",
            "Spans not queued for their owner because forwarding had stopped (shutting down); buffered here.",
            registry=r,
        )
        self.cluster_handed_over_traces = Counter(
            "tailgate_cluster_handed_over_traces",
            "Buffered traces handed undecided to a new owner after a membership change, by member.",
            ["peer"],
            registry=r,
        )
        self.cluster_membership_changes = Counter(
            "tailgate_cluster_membership_changes", "Changes of the member list seen.", registry=r
        )
        self.cluster_membership_connected = gauge(
            "tailgate_cluster_membership_connected",
            "1 while the membership store (Redis) answers; 0 while the last known members are kept.",
        )
        self._callback_counters = CallbackCounters()
        r.register(self._callback_counters)

    def callback_counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A counter whose value another component keeps (read at scrape time)."""
        self._callback_counters.add(name, documentation, read)

    def watch_buffer(
        self, traces: Callable[[], float], spans: Callable[[], float], nbytes: Callable[[], float]
    ) -> None:
        """Read the buffer gauges at scrape time instead of updating them per span."""
        self.buffered_traces.set_function(traces)
        self.buffered_spans.set_function(spans)
        self.buffered_bytes.set_function(nbytes)
