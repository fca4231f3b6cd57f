"""not: a sub-policy's SAMPLED and NOT_SAMPLED swapped; every other decision passed through."""

from __future__ import annotations

import pytest

from policies.base import STATUS_ERROR, Decision
from policies.combine import combine
from tests.policies.conftest import config_error

ERRORS = {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}


def not_policy(build, sub):
    return build({"name": "not", "type": "not", "not": {"not_sub_policy": sub}})


def test_sampled_becomes_not_sampled_and_back(build, make_trace) -> None:
    policy = not_policy(build, ERRORS)
    assert policy.evaluate(make_trace(status_codes=STATUS_ERROR), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(), 0) is Decision.SAMPLED


def test_inverted_decisions_pass_through(build, make_trace) -> None:
    not_test = {
        "name": "not-test",
        "type": "string_attribute",
        "string_attribute": {"key": "env", "values": ["test"], "invert_match": True},
    }
    policy = not_policy(build, not_test)
    assert policy.attribute_keys == frozenset({"env"})
    assert policy.evaluate(make_trace(attributes={"env": ["test"]}), 0) is Decision.INVERT_NOT_SAMPLED
    assert policy.evaluate(make_trace(attributes={"env": ["prod"]}), 0) is Decision.INVERT_SAMPLED


def test_dropped_passes_through(build, make_trace) -> None:
    drop_errors = {"name": "drop-errors", "type": "drop", "drop": {"drop_sub_policy": [ERRORS]}}
    policy = not_policy(build, drop_errors)
    assert policy.evaluate(make_trace(status_codes=STATUS_ERROR), 0) is Decision.DROPPED
    assert policy.evaluate(make_trace(), 0) is Decision.SAMPLED


def test_keeps_what_the_sub_policy_would_not(build, make_trace) -> None:
    # A lone `not` keeps the traces its sub-policy leaves out.
    policy = not_policy(build, ERRORS)
    assert combine([policy.evaluate(make_trace(), 0)])
    assert not combine([policy.evaluate(make_trace(status_codes=STATUS_ERROR), 0)])


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, "tail_sampling.policies[0].not.not_sub_policy: Field required"),
        (
            {"not_sub_policy": [ERRORS]},
            "tail_sampling.policies[0].not.not_sub_policy: must be a mapping with `name` and `type`",
        ),
        (
            {"not_sub_policy": {"name": "slow", "type": "latency", "latency": {"threshold_ms": -1}}},
            "tail_sampling.policies[0].not.not_sub_policy.latency.threshold_ms: "
            "Input should be greater than or equal to 0",
        ),
        (
            {"not_sub_policy": {"type": "always_sample"}},
            "tail_sampling.policies[0].not.not_sub_policy.name: required",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "not", "type": "not", "not": block}
    assert config_error(spec) == message
