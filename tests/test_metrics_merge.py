"""Merging the /metrics of several worker processes: real prometheus_client registries in, one exposition
out that Prometheus (promtool) accepts."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sampler.metrics import Metrics
from sampler.metrics_merge import cumulative, merge_expositions, parse_exposition, render

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def worker_registry(otlp_spans: float, zipkin_spans: float, delays: list[float], start_time: float) -> str:
    """The exposition of a worker-like registry holding one metric of each kind, with labels."""
    registry = CollectorRegistry()
    spans = Counter("tailgate_receiver_spans", "Spans received.", ["protocol", "outcome"], registry=registry)
    if otlp_spans:
        spans.labels("otlp", "accepted").inc(otlp_spans)
    if zipkin_spans:
        spans.labels("zipkin", "accepted").inc(zipkin_spans)
    Gauge("tailgate_buffered_spans", "Spans waiting.", registry=registry).set(otlp_spans + zipkin_spans)
    delay = Histogram(
        "tailgate_decision_delay_seconds",
        "Decision delay.",
        ["policy"],
        buckets=(0.1, 1.0),
        registry=registry,
    )
    for value in delays:
        delay.labels("errors").observe(value)
    export = Summary("tailgate_export_seconds", "Export time.", registry=registry)
    for value in delays:
        export.observe(value)
    Gauge("process_start_time_seconds", "Start time.", registry=registry).set(start_time)
    Gauge("process_max_fds", "Maximum fds.", registry=registry).set(1024)
    Gauge("tailgate_build_info", "Version.", ["version"], registry=registry).labels("0.1.0").set(1)
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[name, frozenset(labels.items())]


def two_workers() -> str:
    return merge_expositions(
        [
            worker_registry(3, 0, [0.05, 0.5], start_time=1000.0),
            worker_registry(4, 2, [2.0], start_time=2000.0),
        ]
    )


def test_counters_gauges_histograms_and_summaries_are_summed_per_label_set() -> None:
    merged = two_workers()
    assert value(merged, "tailgate_receiver_spans_total", protocol="otlp", outcome="accepted") == 7
    # A label set only one worker has is kept as it is.
    assert value(merged, "tailgate_receiver_spans_total", protocol="zipkin", outcome="accepted") == 2
    assert value(merged, "tailgate_buffered_spans") == 9
    bucket = "tailgate_decision_delay_seconds_bucket"
    assert value(merged, bucket, policy="errors", le="0.1") == 1
    assert value(merged, bucket, policy="errors", le="1.0") == 2
    assert value(merged, bucket, policy="errors", le="+Inf") == 3
    assert value(merged, "tailgate_decision_delay_seconds_count", policy="errors") == 3
    assert value(merged, "tailgate_decision_delay_seconds_sum", policy="errors") == pytest.approx(2.55)
    assert value(merged, "tailgate_export_seconds_count") == 3
    assert value(merged, "tailgate_export_seconds_sum") == pytest.approx(2.55)


def test_non_additive_gauges_take_the_max_and_creation_times_the_min() -> None:
    first = worker_registry(3, 0, [], start_time=1000.0)
    second = worker_registry(4, 0, [], start_time=2000.0)
    merged = merge_expositions([first, second])
    assert value(merged, "process_start_time_seconds") == 2000
    assert value(merged, "process_max_fds") == 1024
    assert value(merged, "tailgate_build_info", version="0.1.0") == 1
    created = "tailgate_receiver_spans_created"
    labels = {"protocol": "otlp", "outcome": "accepted"}
    assert value(merged, created, **labels) == min(
        value(first, created, **labels), value(second, created, **labels)
    )


def gateway_metrics(members: int, reloaded: bool, overloaded: bool, reload_time: float) -> str:
    """A worker's own registry (sampler.metrics), with the gauges that describe its state set."""
    metrics = Metrics()
    metrics.cluster_members.set(members)
    metrics.cluster_membership_connected.set(1)
    metrics.config_last_reload_success.set(1 if reloaded else 0)
    metrics.config_last_reload_timestamp.set(reload_time)
    metrics.memory_overloaded.set(1 if overloaded else 0)
    metrics.stress_relief_active.set(0)
    metrics.buffered_spans.set(members * 10)
    return generate_latest(metrics.registry).decode()


def test_gauges_of_a_workers_state_are_not_summed() -> None:
    """A ring of 2 is 2 members, not 4; a reload that failed in one worker leaves the merged flag at 0;
    one overloaded worker makes it 1; the last reload's time is a time, not a sum of times."""
    merged = merge_expositions(
        [
            gateway_metrics(2, reloaded=True, overloaded=False, reload_time=1_800_000_000.0),
            gateway_metrics(2, reloaded=False, overloaded=True, reload_time=1_800_000_001.0),
        ]
    )
    assert value(merged, "tailgate_cluster_members") == 2
    assert value(merged, "tailgate_cluster_membership_connected") == 1
    assert value(merged, "tailgate_config_last_reload_success") == 0
    assert value(merged, "tailgate_config_last_reload_timestamp_seconds") == 1_800_000_001.0
    assert value(merged, "tailgate_memory_overloaded") == 1
    assert value(merged, "tailgate_stress_relief_active") == 0
    assert value(merged, "tailgate_buffered_spans") == 40  # what the workers hold together


def test_output_is_written_as_prometheus_client_writes_it_and_parses_back() -> None:
    merged = two_workers()
    assert "# TYPE tailgate_receiver_spans_total counter\n" in merged
    assert "# HELP tailgate_receiver_spans_total Spans received.\n" in merged
    assert merged.count("# TYPE tailgate_decision_delay_seconds histogram\n") == 1
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert families["tailgate_receiver_spans"].type == "counter"
    assert {sample.name for sample in families["tailgate_receiver_spans"].samples} == {
        "tailgate_receiver_spans_total"
    }
    assert families["tailgate_decision_delay_seconds"].type == "histogram"
    assert families["tailgate_export_seconds"].type == "summary"
    # Merging the merged exposition alone changes nothing.
    assert merge_expositions([merged]) == merged


def test_a_counter_written_without_total_merges_as_one() -> None:
    foreign = "# HELP jobs Jobs done.\n# TYPE jobs counter\njobs 3\n"
    merged = merge_expositions([foreign, foreign])
    assert merged == "# HELP jobs_total Jobs done.\n# TYPE jobs_total counter\njobs_total 6.0\n"


def test_a_family_whose_type_differs_from_the_first_is_left_out() -> None:
    gauge = "# HELP queue Items.\n# TYPE queue gauge\nqueue 3\n"
    untyped = "queue 5\n"
    assert value(merge_expositions([gauge, untyped]), "queue") == 3


def test_a_malformed_exposition_is_an_error() -> None:
    with pytest.raises(ValueError):
        merge_expositions([worker_registry(1, 0, [], 1.0), "tailgate_buffered_spans{ 1\n"])


def test_cumulative_keeps_counters_histograms_and_summary_counts_only() -> None:
    registry = CollectorRegistry()
    Counter("jobs", "Jobs.", registry=registry).inc(2)
    Gauge("queue", "Items.", registry=registry).set(7)
    Histogram("delay", "Delay.", buckets=(1.0,), registry=registry).observe(0.5)
    kept = render(cumulative(parse_exposition(generate_latest(registry).decode())))
    assert value(kept, "jobs_total") == 2
    assert value(kept, "delay_bucket", le="1.0") == 1
    assert value(kept, "delay_count") == 1
    names = {family.name for family in text_string_to_metric_families(kept)}
    assert names == {"jobs", "delay"}  # no gauges, no `_created` timestamps


@pytest.mark.skipif(not shutil.which(PROMTOOL), reason="promtool is not installed")
def test_promtool_accepts_merged_gateway_metrics() -> None:
    workers = [Metrics(), Metrics()]
    for index, metrics in enumerate(workers):
        metrics.received_spans.labels("otlp", "accepted").inc(10 + index)
    merged = merge_expositions([generate_latest(metrics.registry).decode() for metrics in workers])
    assert value(merged, "tailgate_receiver_spans_total", protocol="otlp", outcome="accepted") == 21
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=merged, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=two_workers(), capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stdout + result.stderr
