"""bytes_limiting: a token bucket of bytes (the trace's serialized size), refilled by `now`."""

from __future__ import annotations

import pytest

from policies.base import Decision
from tests.policies.conftest import config_error

KB = 1024


def bytes_limiter(build, **block):
    return build({"name": "bl", "type": "bytes_limiting", "bytes_limiting": block})


def test_burst_then_refill(build, make_trace) -> None:
    policy = bytes_limiter(build, bytes_per_second=100 * KB, burst_capacity=300 * KB)
    kept = [policy.evaluate(make_trace(nbytes=100 * KB), 10.0) for _ in range(4)]
    assert kept == [Decision.SAMPLED] * 3 + [Decision.NOT_SAMPLED]
    # Half a second later 50 KB are back: a 60 KB trace waits, a 50 KB one goes.
    half_second = [policy.evaluate(make_trace(nbytes=size * KB), 10.5) for size in (60, 50, 1)]
    assert half_second == [Decision.NOT_SAMPLED, Decision.SAMPLED, Decision.NOT_SAMPLED]


def test_default_burst_is_twice_the_rate_and_the_bucket_never_overfills(build, make_trace) -> None:
    policy = bytes_limiter(build, bytes_per_second=KB)
    assert policy.evaluate(make_trace(nbytes=2 * KB + 1), 0.0) is Decision.NOT_SAMPLED
    after_a_day = [policy.evaluate(make_trace(nbytes=KB), 86_400.0) for _ in range(3)]
    assert after_a_day == [Decision.SAMPLED, Decision.SAMPLED, Decision.NOT_SAMPLED]


def test_counts_bytes_not_spans(build, make_trace) -> None:
    policy = bytes_limiter(build, bytes_per_second=1000, burst_capacity=1000)
    assert policy.evaluate(make_trace(span_count=500, nbytes=900), 0.0) is Decision.SAMPLED
    assert policy.evaluate(make_trace(span_count=1, nbytes=200), 0.0) is Decision.NOT_SAMPLED
    assert policy.attribute_keys == frozenset()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, "tail_sampling.policies[0].bytes_limiting.bytes_per_second: Field required"),
        (
            {"bytes_per_second": -5},
            "tail_sampling.policies[0].bytes_limiting.bytes_per_second: Input should be greater than 0",
        ),
        (
            {"bytes_per_second": 1000, "burst_capacity": "lots"},
            "tail_sampling.policies[0].bytes_limiting.burst_capacity: "
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            {"bytes_per_second": 1000, "burst_capacity": -1},
            "tail_sampling.policies[0].bytes_limiting.burst_capacity: "
            "Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "bl", "type": "bytes_limiting", "bytes_limiting": block}
    assert config_error(spec) == message
