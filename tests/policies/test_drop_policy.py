"""drop: DROPPED when every sub-policy matches (no NOT_SAMPLED or INVERT_NOT_SAMPLED), else NOT_SAMPLED."""

from __future__ import annotations

import pytest

from policies.base import STATUS_ERROR, Decision
from policies.combine import combine
from policies.drop_policy import Drop
from policies.registry import build_policies
from sampler.errors import ConfigError
from tests.policies.conftest import config_error

HEALTH = {
    "name": "health",
    "type": "string_attribute",
    "string_attribute": {"key": "url.path", "values": ["/health", "/metrics"]},
}
NOT_ERROR = {
    "name": "no-error",
    "type": "not",
    "not": {
        "not_sub_policy": {"name": "e", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}
    },
}
NOT_PROD = {
    "name": "not-prod",
    "type": "string_attribute",
    "string_attribute": {"key": "env", "values": ["prod"], "invert_match": True},
}


def drop_policy(build, *subs):
    return build({"name": "drop", "type": "drop", "drop": {"drop_sub_policy": list(subs)}})


def test_dropped_when_every_sub_policy_matches(build, make_trace) -> None:
    policy = drop_policy(build, HEALTH, NOT_ERROR)
    trace = make_trace(attributes={"url.path": ["/health"]})
    assert policy.evaluate(trace, 0) is Decision.DROPPED
    # A drop decision wins over any policy that would keep the trace.
    assert not combine([Decision.SAMPLED, policy.evaluate(trace, 0)])


def test_not_sampled_when_a_sub_policy_does_not_match(build, make_trace) -> None:
    policy = drop_policy(build, HEALTH, NOT_ERROR)
    failing_probe = make_trace(attributes={"url.path": ["/health"]}, status_codes=STATUS_ERROR)
    assert policy.evaluate(failing_probe, 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(attributes={"url.path": ["/checkout"]}), 0) is Decision.NOT_SAMPLED
    assert combine([Decision.SAMPLED, policy.evaluate(failing_probe, 0)])


def test_inverted_sub_policies(build, make_trace) -> None:
    policy = drop_policy(build, HEALTH, NOT_PROD)
    staging = make_trace(attributes={"url.path": ["/health"], "env": ["staging"]})
    prod = make_trace(attributes={"url.path": ["/health"], "env": ["prod"]})
    assert policy.evaluate(staging, 0) is Decision.DROPPED  # INVERT_SAMPLED matches
    assert policy.evaluate(prod, 0) is Decision.NOT_SAMPLED  # INVERT_NOT_SAMPLED does not


def test_stops_at_the_first_sub_policy_that_does_not_match(build, make_trace) -> None:
    # A rate limiter after a non-matching sub-policy is not charged for the trace.
    limit = {"name": "rl", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 5}}
    policy = drop_policy(build, HEALTH, limit)
    for _ in range(5):
        assert policy.evaluate(make_trace(span_count=10), 1.0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(span_count=10, attributes={"url.path": ["/metrics"]}), 1.0) is (
        Decision.DROPPED
    )


def test_a_drop_policy_is_recognisable(build) -> None:
    policy = drop_policy(build, HEALTH, NOT_PROD)
    assert isinstance(policy, Drop)
    assert policy.type_name == "drop"
    assert policy.attribute_keys == frozenset({"url.path", "env"})


def test_sub_policy_errors_name_their_full_paths() -> None:
    spec = {
        "name": "drop",
        "type": "drop",
        "drop": {
            "drop_sub_policy": [
                HEALTH,
                {"name": "health", "type": "trace_flags"},
                {"name": "sc", "type": "span_count", "span_count": {"min_spans": -1}},
            ]
        },
    }
    with pytest.raises(ConfigError) as caught:
        build_policies([spec], "tail_sampling.policies")
    prefix = "tail_sampling.policies[0].drop.drop_sub_policy"
    assert str(caught.value).splitlines() == [
        f"{prefix}[1].name: duplicate policy name 'health' (also {prefix}[0])",
        f"{prefix}[2].span_count.min_spans: Input should be greater than or equal to 0",
    ]


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"drop_sub_policy": []},
            "tail_sampling.policies[0].drop.drop_sub_policy: "
            "List should have at least 1 item after validation, not 0",
        ),
        ({}, "tail_sampling.policies[0].drop.drop_sub_policy: Field required"),
        (
            {"drop_sub_policy": HEALTH},
            "tail_sampling.policies[0].drop.drop_sub_policy: Input should be a valid list",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "drop", "type": "drop", "drop": block}
    assert config_error(spec) == message
