"""numeric_attribute: inclusive ranges over integer and double attribute values, and invert_match."""

from __future__ import annotations

import pytest

from policies.base import Decision
from tests.policies.conftest import config_error


def numeric_policy(build, **block):
    return build({"name": "na", "type": "numeric_attribute", "numeric_attribute": block})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([400], Decision.SAMPLED),
        ([499], Decision.SAMPLED),
        ([200, 450.5], Decision.SAMPLED),
        ([399], Decision.NOT_SAMPLED),
        ([500], Decision.NOT_SAMPLED),
        ([399.99], Decision.NOT_SAMPLED),
        (["450", True], Decision.NOT_SAMPLED),
        ([], Decision.NOT_SAMPLED),
    ],
)
def test_inclusive_range(build, make_trace, values, expected) -> None:
    policy = numeric_policy(build, key="http.status_code", min_value=400, max_value=499)
    trace = make_trace(attributes={"http.status_code": values})
    assert policy.evaluate(trace, 0) is expected
    assert policy.attribute_keys == frozenset({"http.status_code"})


def test_booleans_are_not_numbers(build, make_trace) -> None:
    policy = numeric_policy(build, key="k", min_value=0, max_value=1)
    assert policy.evaluate(make_trace(attributes={"k": [True, False]}), 0) is Decision.NOT_SAMPLED


def test_open_ended_ranges(build, make_trace) -> None:
    at_least = numeric_policy(build, key="k", min_value=10)
    at_most = numeric_policy(build, key="k", max_value=10)
    big, small = make_trace(attributes={"k": [2**62]}), make_trace(attributes={"k": [-(2**62)]})
    assert at_least.evaluate(big, 0) is Decision.SAMPLED
    assert at_least.evaluate(small, 0) is Decision.NOT_SAMPLED
    assert at_most.evaluate(big, 0) is Decision.NOT_SAMPLED
    assert at_most.evaluate(small, 0) is Decision.SAMPLED


def test_invert_match(build, make_trace) -> None:
    policy = numeric_policy(build, key="k", min_value=1, max_value=5, invert_match=True)
    decide = policy.evaluate
    assert decide(make_trace(attributes={"k": [9, 3]}), 0) is Decision.INVERT_NOT_SAMPLED
    assert decide(make_trace(attributes={"k": [9]}), 0) is Decision.INVERT_SAMPLED
    assert decide(make_trace(), 0) is Decision.INVERT_SAMPLED


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"key": "k"},
            "tail_sampling.policies[0].numeric_attribute: at least one of min_value or max_value must be set",
        ),
        (
            {"key": "k", "min_value": 10, "max_value": 1},
            "tail_sampling.policies[0].numeric_attribute: min_value (10) must not exceed max_value (1)",
        ),
        (
            {"key": "k", "min_value": 1.5},
            "tail_sampling.policies[0].numeric_attribute.min_value: "
            "Input should be a valid integer, got a number with a fractional part",
        ),
        (
            {"min_value": 1},
            "tail_sampling.policies[0].numeric_attribute.key: Field required",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "na", "type": "numeric_attribute", "numeric_attribute": block}
    assert config_error(spec) == message
