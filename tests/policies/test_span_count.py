"""span_count: the trace's number of spans within inclusive bounds, max_spans 0 meaning no upper bound."""

from __future__ import annotations

import pytest

from policies.base import Decision
from tests.policies.conftest import config_error


def span_count_policy(build, **block):
    return build({"name": "sc", "type": "span_count", "span_count": block})


@pytest.mark.parametrize(
    ("spans", "expected"),
    [
        (1, Decision.NOT_SAMPLED),
        (2, Decision.SAMPLED),
        (10, Decision.SAMPLED),
        (20, Decision.SAMPLED),
        (21, Decision.NOT_SAMPLED),
    ],
)
def test_inclusive_bounds(build, make_trace, spans, expected) -> None:
    policy = span_count_policy(build, min_spans=2, max_spans=20)
    assert policy.evaluate(make_trace(span_count=spans), 0) is expected


def test_without_max_spans_there_is_no_upper_bound(build, make_trace) -> None:
    for block in ({"min_spans": 3}, {"min_spans": 3, "max_spans": 0}):
        policy = span_count_policy(build, **block)
        assert policy.evaluate(make_trace(span_count=2), 0) is Decision.NOT_SAMPLED
        assert policy.evaluate(make_trace(span_count=3), 0) is Decision.SAMPLED
        assert policy.evaluate(make_trace(span_count=1_000_000), 0) is Decision.SAMPLED


def test_max_spans_alone(build, make_trace) -> None:
    policy = span_count_policy(build, max_spans=5)
    assert policy.evaluate(make_trace(span_count=1), 0) is Decision.SAMPLED
    assert policy.evaluate(make_trace(span_count=5), 0) is Decision.SAMPLED
    assert policy.evaluate(make_trace(span_count=6), 0) is Decision.NOT_SAMPLED
    assert policy.attribute_keys == frozenset()


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {},
            "tail_sampling.policies[0].span_count: at least one of min_spans or max_spans must be set",
        ),
        (
            {"min_spans": 10, "max_spans": 5},
            "tail_sampling.policies[0].span_count: min_spans (10) must not exceed max_spans (5)",
        ),
        (
            {"min_spans": -1},
            "tail_sampling.policies[0].span_count.min_spans: Input should be greater than or equal to 0",
        ),
        (
            {"min_spans": "two"},
            "tail_sampling.policies[0].span_count.min_spans: "
            "Input should be a valid integer, unable to parse string as an integer",
        ),
        (
            # The Collector's span_count has no invert_match.
            {"min_spans": 2, "invert_match": True},
            "tail_sampling.policies[0].span_count.invert_match: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "sc", "type": "span_count", "span_count": block}
    assert config_error(spec) == message
