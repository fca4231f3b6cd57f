"""rate_limiting: a token bucket of spans, burst_capacity deep, refilled at spans_per_second by `now`."""

from __future__ import annotations

import pytest

from policies.base import Decision
from policies.rate_limiting import TokenBucket
from tests.policies.conftest import config_error


def limiter(build, **block):
    return build({"name": "rl", "type": "rate_limiting", "rate_limiting": block})


def test_a_full_bucket_keeps_a_burst_of_twice_the_rate_by_default(build, make_trace) -> None:
    policy = limiter(build, spans_per_second=10)
    decide = policy.evaluate
    assert decide(make_trace(span_count=15), 100.0) is Decision.SAMPLED
    assert decide(make_trace(span_count=5), 100.0) is Decision.SAMPLED  # 20 = 2 x 10
    assert decide(make_trace(span_count=1), 100.0) is Decision.NOT_SAMPLED


def test_refills_continuously_with_the_clock(build, make_trace) -> None:
    policy = limiter(build, spans_per_second=10)
    decide = policy.evaluate
    assert decide(make_trace(span_count=20), 50.0) is Decision.SAMPLED
    # A quarter of a second brings 2.5 spans: 3 do not fit, 2 do, then half a span is left.
    assert decide(make_trace(span_count=3), 50.25) is Decision.NOT_SAMPLED
    assert decide(make_trace(span_count=2), 50.25) is Decision.SAMPLED
    assert decide(make_trace(span_count=1), 50.25) is Decision.NOT_SAMPLED
    assert decide(make_trace(span_count=1), 50.3125) is Decision.SAMPLED  # 0.5 + 0.625


def test_an_idle_bucket_holds_no_more_than_its_capacity(build, make_trace) -> None:
    policy = limiter(build, spans_per_second=10, burst_capacity=4)
    decide = policy.evaluate
    assert decide(make_trace(span_count=4), 0.0) is Decision.SAMPLED
    # An hour idle refills the bucket to 4 spans, not 36 000.
    assert decide(make_trace(span_count=4), 3600.0) is Decision.SAMPLED
    assert decide(make_trace(span_count=1), 3600.0) is Decision.NOT_SAMPLED


def test_a_trace_larger_than_the_capacity_is_never_kept_and_takes_nothing(build, make_trace) -> None:
    policy = limiter(build, spans_per_second=100, burst_capacity=50)
    assert policy.evaluate(make_trace(span_count=51), 0.0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(span_count=51), 1000.0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(span_count=50), 1000.0) is Decision.SAMPLED


def test_each_policy_has_its_own_bucket(build, make_trace) -> None:
    first, second = limiter(build, spans_per_second=5), limiter(build, spans_per_second=5)
    assert first.evaluate(make_trace(span_count=10), 1.0) is Decision.SAMPLED
    assert second.evaluate(make_trace(span_count=10), 1.0) is Decision.SAMPLED
    assert first.attribute_keys == frozenset()


def test_a_clock_going_back_adds_no_tokens() -> None:
    bucket = TokenBucket(rate=10, capacity=10)
    assert bucket.take(10, 5.0)
    assert not bucket.take(1, 4.0)
    assert not bucket.take(1, 5.0)  # the refill counts from 5.0, not from 4.0
    assert bucket.take(1, 5.125)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"spans_per_second": 0},
            "tail_sampling.policies[0].rate_limiting.spans_per_second: Input should be greater than 0",
        ),
        (None, "tail_sampling.policies[0].rate_limiting.spans_per_second: Field required"),
        ([100], "tail_sampling.policies[0].rate_limiting: must be a mapping"),
        (
            {"spans_per_second": 10, "burst_capacity": -1},
            "tail_sampling.policies[0].rate_limiting.burst_capacity: "
            "Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "rl", "type": "rate_limiting"}
    if block is not None:
        spec["rate_limiting"] = block
    assert config_error(spec) == message
