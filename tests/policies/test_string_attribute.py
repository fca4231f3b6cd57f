"""string_attribute: exact and regex matching of string attribute values, and invert_match."""

from __future__ import annotations

import pytest

from policies.base import Decision
from tests.policies.conftest import config_error


def string_policy(build, **block):
    return build({"name": "sa", "type": "string_attribute", "string_attribute": block})


def test_exact_match(build, make_trace) -> None:
    policy = string_policy(build, key="http.route", values=["/checkout", "/cart"])
    trace = make_trace(attributes={"http.route": ["/home", "/cart"]})
    assert policy.evaluate(trace, 0) is Decision.SAMPLED
    assert policy.attribute_keys == frozenset({"http.route"})


def test_exact_non_match(build, make_trace) -> None:
    policy = string_policy(build, key="http.route", values=["/checkout"])
    assert policy.evaluate(make_trace(attributes={"http.route": ["/checkouts"]}), 0) is (Decision.NOT_SAMPLED)
    assert policy.evaluate(make_trace(), 0) is Decision.NOT_SAMPLED


def test_only_non_empty_strings_match(build, make_trace) -> None:
    policy = string_policy(build, key="k", values=["5", "True", ""])
    trace = make_trace(attributes={"k": [5, True, 5.0, ""]})
    assert policy.evaluate(trace, 0) is Decision.NOT_SAMPLED


def test_regex_is_an_unanchored_search(build, make_trace) -> None:
    # As Go's regexp.MatchString in the Collector: a match anywhere in the value counts.
    policy = string_policy(build, key="url", values=["api/v[0-9]+"], enabled_regex_matching=True)
    assert policy.evaluate(make_trace(attributes={"url": ["https://x/api/v2/a"]}), 0) is (Decision.SAMPLED)
    assert policy.evaluate(make_trace(attributes={"url": ["https://x/api/vX"]}), 0) is (Decision.NOT_SAMPLED)


def test_regex_anchors_are_honoured(build, make_trace) -> None:
    policy = string_policy(
        build, key="svc", values=["^front$", "^back"], enabled_regex_matching=True, cache_max_size=2
    )
    decide = policy.evaluate
    assert decide(make_trace(attributes={"svc": ["frontend"]}), 0) is Decision.NOT_SAMPLED
    assert decide(make_trace(attributes={"svc": ["front"]}), 0) is Decision.SAMPLED
    assert decide(make_trace(attributes={"svc": ["backend"]}), 0) is Decision.SAMPLED
    # Repeated values go through the result cache and must give the same answers.
    for _ in range(3):
        assert decide(make_trace(attributes={"svc": ["frontend", "x", "y"]}), 0) is (Decision.NOT_SAMPLED)
        assert decide(make_trace(attributes={"svc": ["backend"]}), 0) is Decision.SAMPLED


@pytest.mark.parametrize("regex", [False, True])
def test_invert_match(build, make_trace, regex) -> None:
    policy = string_policy(build, key="env", values=["test"], invert_match=True, enabled_regex_matching=regex)
    decide = policy.evaluate
    assert decide(make_trace(attributes={"env": ["prod", "test"]}), 0) is Decision.INVERT_NOT_SAMPLED
    assert decide(make_trace(attributes={"env": ["prod"]}), 0) is Decision.INVERT_SAMPLED
    # A trace without the attribute is kept by an inverted match, as in the Collector.
    assert decide(make_trace(), 0) is Decision.INVERT_SAMPLED


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"key": "k", "values": ["ok", "a(b"], "enabled_regex_matching": True},
            "tail_sampling.policies[0].string_attribute.values[1]: not a valid regular "
            "expression: missing ), unterminated subpattern at position 1",
        ),
        (
            {"key": "k", "values": []},
            "tail_sampling.policies[0].string_attribute.values: "
            "List should have at least 1 item after validation, not 0",
        ),
        (
            {"values": ["x"]},
            "tail_sampling.policies[0].string_attribute.key: Field required",
        ),
        (
            {"key": "k", "values": "x"},
            "tail_sampling.policies[0].string_attribute.values: Input should be a valid list",
        ),
        (
            {"key": "k", "values": ["x"], "cache_max_size": -1},
            "tail_sampling.policies[0].string_attribute.cache_max_size: "
            "Input should be greater than or equal to 0",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "sa", "type": "string_attribute", "string_attribute": block}
    assert config_error(spec) == message


def test_invalid_pattern_is_fine_without_regex_matching(build, make_trace) -> None:
    policy = string_policy(build, key="k", values=["a(b"])
    assert policy.evaluate(make_trace(attributes={"k": ["a(b"]}), 0) is Decision.SAMPLED
