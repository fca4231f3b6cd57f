"""boolean_attribute: a resource or span attribute that is a boolean equal to `value`, and invert_match."""

from __future__ import annotations

import pytest

from policies.base import Decision
from tests.policies.conftest import config_error


def boolean_policy(build, **block):
    return build({"name": "ba", "type": "boolean_attribute", "boolean_attribute": block})


@pytest.mark.parametrize("value", [True, False])
def test_match(build, make_trace, value) -> None:
    policy = boolean_policy(build, key="app.force_sample", value=value)
    trace = make_trace(attributes={"app.force_sample": [not value, value]})
    assert policy.evaluate(trace, 0) is Decision.SAMPLED
    assert policy.attribute_keys == frozenset({"app.force_sample"})


def test_non_match(build, make_trace) -> None:
    policy = boolean_policy(build, key="app.force_sample", value=True)
    assert policy.evaluate(make_trace(attributes={"app.force_sample": [False]}), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(attributes={"other": [True]}), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(), 0) is Decision.NOT_SAMPLED


@pytest.mark.parametrize("value", [True, False])
def test_only_booleans_match(build, make_trace, value) -> None:
    # 1 == True and 0 == False in Python; neither numbers nor strings are booleans here.
    policy = boolean_policy(build, key="k", value=value)
    trace = make_trace(attributes={"k": [1, 0, 1.0, 0.0, "true", "false", ""]})
    assert policy.evaluate(trace, 0) is Decision.NOT_SAMPLED


def test_invert_match(build, make_trace) -> None:
    policy = boolean_policy(build, key="app.do_not_sample", value=True, invert_match=True)
    decide = policy.evaluate
    assert decide(make_trace(attributes={"app.do_not_sample": [False, True]}), 0) is (
        Decision.INVERT_NOT_SAMPLED
    )
    assert decide(make_trace(attributes={"app.do_not_sample": [False]}), 0) is Decision.INVERT_SAMPLED
    # A trace without the attribute is kept by an inverted match, as in the Collector.
    assert decide(make_trace(), 0) is Decision.INVERT_SAMPLED


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"key": "k"}, "tail_sampling.policies[0].boolean_attribute.value: Field required"),
        (
            {"key": "k", "value": "yes"},
            "tail_sampling.policies[0].boolean_attribute.value: Input should be a valid boolean",
        ),
        (
            {"key": "k", "value": 1},
            "tail_sampling.policies[0].boolean_attribute.value: Input should be a valid boolean",
        ),
        (
            {"key": "", "value": True},
            "tail_sampling.policies[0].boolean_attribute.key: String should have at least 1 character",
        ),
        (
            {"key": "k", "value": True, "values": [True]},
            "tail_sampling.policies[0].boolean_attribute.values: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "ba", "type": "boolean_attribute", "boolean_attribute": block}
    assert config_error(spec) == message
