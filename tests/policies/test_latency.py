"""latency: keeps traces by their duration from first span start to last span end."""

from __future__ import annotations

import pytest

from policies.base import Decision
from tests.policies.conftest import config_error

MS = 1_000_000
START = 1_700_000_000 * 10**9


def trace_lasting(make_trace, duration_ns: int):
    return make_trace(min_start_ns=START, max_end_ns=START + duration_ns)


@pytest.mark.parametrize(
    ("duration_ns", "expected"),
    [
        (500 * MS, Decision.SAMPLED),
        (501 * MS, Decision.SAMPLED),
        # 499.999999 ms counts as 499 ms: durations are truncated to whole milliseconds.
        (500 * MS - 1, Decision.NOT_SAMPLED),
        (0, Decision.NOT_SAMPLED),
    ],
)
def test_lower_threshold_only(build, make_trace, duration_ns, expected) -> None:
    policy = build({"name": "slow", "type": "latency", "latency": {"threshold_ms": 500}})
    assert policy.evaluate(trace_lasting(make_trace, duration_ns), 0) is expected


@pytest.mark.parametrize(
    ("duration_ms", "expected"),
    [
        (100, Decision.NOT_SAMPLED),
        (101, Decision.SAMPLED),
        (200, Decision.SAMPLED),
        (201, Decision.NOT_SAMPLED),
    ],
)
def test_with_upper_threshold(build, make_trace, duration_ms, expected) -> None:
    block = {"threshold_ms": 100, "upper_threshold_ms": 200}
    policy = build({"name": "band", "type": "latency", "latency": block})
    assert policy.evaluate(trace_lasting(make_trace, duration_ms * MS), 0) is expected


def test_upper_threshold_zero_means_unset(build, make_trace) -> None:
    block = {"threshold_ms": 100, "upper_threshold_ms": 0}
    policy = build({"name": "slow", "type": "latency", "latency": block})
    assert policy.evaluate(trace_lasting(make_trace, 10_000 * MS), 0) is Decision.SAMPLED


def test_end_before_start_counts_as_zero(build, make_trace) -> None:
    policy = build({"name": "slow", "type": "latency", "latency": {"threshold_ms": 1}})
    trace = make_trace(min_start_ns=START, max_end_ns=START - 5 * MS)
    assert policy.evaluate(trace, 0) is Decision.NOT_SAMPLED


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"threshold_ms": -1},
            "tail_sampling.policies[0].latency.threshold_ms: Input should be greater than or equal to 0",
        ),
        (
            {"threshold_ms": 200, "upper_threshold_ms": 200},
            "tail_sampling.policies[0].latency.upper_threshold_ms: must be greater than threshold_ms (200)",
        ),
        (None, "tail_sampling.policies[0].latency.threshold_ms: Field required"),
        (
            {"threshold_ms": 10, "threshold": 5},
            "tail_sampling.policies[0].latency.threshold: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "slow", "type": "latency"}
    if block is not None:
        spec["latency"] = block
    assert config_error(spec) == message
