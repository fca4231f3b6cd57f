"""and: a trace passes only when every sub-policy passes; sub-policy errors name their full key path."""

from __future__ import annotations

import pytest

from policies.base import STATUS_ERROR, Decision
from policies.registry import build_policies
from sampler.errors import ConfigError
from tests.policies.conftest import config_error
from tests.policies.test_policy_registry import KNOWN

MS = 1_000_000


def and_policy(build, *subs):
    return build({"name": "both", "type": "and", "and": {"and_sub_policy": list(subs)}})


ERRORS = {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}
SLOW = {"name": "slow", "type": "latency", "latency": {"threshold_ms": 100}}
CHECKOUT = {
    "name": "checkout",
    "type": "string_attribute",
    "string_attribute": {"key": "http.route", "values": ["/checkout"]},
}
NOT_TEST = {
    "name": "not-test",
    "type": "string_attribute",
    "string_attribute": {"key": "env", "values": ["test"], "invert_match": True},
}


def slow_error_trace(make_trace, **extra):
    return make_trace(status_codes=STATUS_ERROR, min_start_ns=0, max_end_ns=200 * MS, **extra)


def test_all_sub_policies_match(build, make_trace) -> None:
    policy = and_policy(build, ERRORS, SLOW)
    assert policy.evaluate(slow_error_trace(make_trace), 0) is Decision.SAMPLED


def test_one_sub_policy_does_not_match(build, make_trace) -> None:
    policy = and_policy(build, ERRORS, SLOW)
    fast_error = make_trace(status_codes=STATUS_ERROR, max_end_ns=50 * MS)
    assert policy.evaluate(fast_error, 0) is Decision.NOT_SAMPLED


def test_inverted_sub_policies(build, make_trace) -> None:
    policy = and_policy(build, ERRORS, NOT_TEST)
    prod = slow_error_trace(make_trace, attributes={"env": ["prod"]})
    test = slow_error_trace(make_trace, attributes={"env": ["test"]})
    assert policy.evaluate(prod, 0) is Decision.SAMPLED  # INVERT_SAMPLED passes
    assert policy.evaluate(test, 0) is Decision.NOT_SAMPLED  # INVERT_NOT_SAMPLED fails


def test_attribute_keys_are_the_union(build) -> None:
    policy = and_policy(build, CHECKOUT, NOT_TEST, ERRORS)
    assert policy.attribute_keys == frozenset({"http.route", "env"})


def test_stops_at_the_first_failing_sub_policy(build, make_trace) -> None:
    # A rate limiter after a failing sub-policy is not charged for the trace.
    limit = {"name": "rl", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 10}}
    policy = and_policy(build, ERRORS, limit)
    for _ in range(5):
        assert policy.evaluate(make_trace(span_count=5), 1.0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(span_count=9, status_codes=STATUS_ERROR), 1.0) is (Decision.SAMPLED)


def test_nested_sub_policy_errors_name_the_full_path() -> None:
    specs = [
        {"name": "a", "type": "always_sample"},
        {"name": "b", "type": "always_sample"},
        {"name": "c", "type": "always_sample"},
        {
            "name": "both",
            "type": "and",
            "and": {
                "and_sub_policy": [
                    {"type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
                    {"name": "x", "type": "latency", "latency": {"threshold_ms": -5}},
                    {"name": "x", "type": "latencyy"},
                    "always_sample",
                ]
            },
        },
    ]
    with pytest.raises(ConfigError) as caught:
        build_policies(specs, "tail_sampling.policies")
    prefix = "tail_sampling.policies[3].and.and_sub_policy"
    assert str(caught.value).splitlines() == [
        f"{prefix}[0].name: required",
        f"{prefix}[1].latency.threshold_ms: Input should be greater than or equal to 0",
        f"{prefix}[2].name: duplicate policy name 'x' (also {prefix}[1])",
        f"{prefix}[2].type: unknown policy type 'latencyy' (known: {KNOWN})",
        f"{prefix}[3]: must be a mapping with `name` and `type`",
    ]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"and_sub_policy": []},
            "tail_sampling.policies[0].and.and_sub_policy: "
            "List should have at least 1 item after validation, not 0",
        ),
        (None, "tail_sampling.policies[0].and.and_sub_policy: Field required"),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "both", "type": "and"}
    if block is not None:
        spec["and"] = block
    assert config_error(spec) == message
