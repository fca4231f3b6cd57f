"""One Prometheus exposition from several: the `/metrics` of `workers: N` worker processes, summed per
metric family and label set, as the supervisor serves it."""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# Gauges that describe a process or its view rather than count something: every worker reports the same
# or its own value, and a sum would mean nothing (two workers do not make build_info 2, nor a ring of 2
# members 4). They take the max: for a flag (overloaded, stress relief on), whether any worker has it.
NON_ADDITIVE = frozenset(
    {
        "tailgate_build_info",
        "process_start_time_seconds",
        "python_info",
        "process_max_fds",
        "tailgate_memory_overloaded",
        "tailgate_stress_relief_active",
        "tailgate_config_last_reload_timestamp_seconds",
        "tailgate_cluster_members",
    }
)
# Flags that hold only if they hold in every worker: 1 when all of them are 1, so that an alert on 0
# fires when one worker's reload failed or lost its membership store.
ALL_OF = frozenset({"tailgate_config_last_reload_success", "tailgate_cluster_membership_connected"})
# Families that only ever grow within one process: what a worker that is gone had counted is still part
# of the total (see `cumulative`).
CUMULATIVE_TYPES = frozenset({"counter", "histogram", "summary"})

_SampleKey = tuple[str, tuple[tuple[str, str], ...]]
_Combine = Callable[[float, float], float]


def parse_exposition(text: str) -> list[Metric]:
    """The metric families of a Prometheus text exposition; ValueError if it is malformed."""
    families = list(text_string_to_metric_families(text))
    for family in families:
        if family.type == "counter":
            # The parser names a counter family without `_total`; a sample written without it too
            # (not by prometheus_client) is renamed so that the output reads as one counter.
            family.samples = [
                sample._replace(name=f"{family.name}_total") if sample.name == family.name else sample
                for sample in family.samples
            ]
    return families


def _combine(family: Metric, sample: Sample) -> _Combine:
    if family.name in NON_ADDITIVE:
        return max
    if family.name in ALL_OF:
        return min
    if family.type == "gauge" and family.name.endswith("_created"):
        # When a counter or histogram was created (prometheus_client writes these as gauges): the
        # merged series counts from the earliest creation.
        return min
    if family.type == "summary" and "quantile" in sample.labels:
        # Quantiles of different processes cannot be combined; the largest is an upper bound.
        return max
    return operator.add


def merge_families(expositions: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Families of every exposition, merged by name: HELP and TYPE of the first one that has the family,
    samples with the same name and labels summed (or combined as `_combine` says). A family whose type
    differs from the first one's is left out."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[_SampleKey, float]] = {}
    for families in expositions:
        for family in families:
            first = merged.get(family.name)
            if first is None:
                first = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            elif first.type != family.type:
                continue
            family_values = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                current = family_values.get(key)
                family_values[key] = (
                    sample.value if current is None else _combine(family, sample)(current, sample.value)
                )
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


def cumulative(families: Iterable[Metric]) -> list[Metric]:
    """The counter, histogram and summary families alone (summaries without quantiles): what stays part
    of a total after the process that counted it has exited, so that the merged counters never go back."""
    kept = []
    for family in families:
        if family.type not in CUMULATIVE_TYPES:
            continue
        copy = Metric(family.name, family.documentation, family.type, family.unit)
        copy.samples = [sample for sample in family.samples if "quantile" not in sample.labels]
        kept.append(copy)
    return kept


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> str:
    """The text exposition of `families`, written as prometheus_client writes a registry's."""
    return generate_latest(_Families(families)).decode()


def merge_expositions(texts: list[str]) -> str:
    """One text exposition holding every family of `texts`, samples summed across them (max for the
    `NON_ADDITIVE` gauges, min for the `ALL_OF` ones); ValueError if one of them is malformed."""
    return render(merge_families(parse_exposition(text) for text in texts))
