"""rules: first matching rule wins; span and root scopes; keep, drop and deterministic sample actions."""

from __future__ import annotations

import random

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from policies.base import Decision
from tests.policies.conftest import config_error
from tests.policies.test_conditions import server_error_span, trace_of


def rules_policy(build, *rules, name: str = "rules"):
    return build({"name": name, "type": "rules", "rules": {"rules": list(rules)}})


def rule(action: str, *conditions: tuple, **extra):
    """A rule from (field, operator[, value]) tuples."""
    listed = [dict(zip(("field", "operator", "value"), condition, strict=False)) for condition in conditions]
    return {"action": action, "conditions": listed, **extra}


@pytest.mark.parametrize(
    "condition",
    [
        ("name", "=", "GET /api/users"),
        ("name", "!=", "GET /"),
        ("kind", "=", "server"),
        ("kind", "=", "SPAN_KIND_SERVER"),
        ("kind", "!=", 3),
        ("status", "=", "error"),
        ("status", "=", "STATUS_CODE_ERROR"),
        ("duration_ms", ">", 1000),
        ("duration_ms", "<=", 1500.0),
        ("attributes.http.status_code", ">=", 500),
        ("attributes.http.status_code", "<", 503.5),
        ("attributes.http.status_code", "=", 503.0),
        ("attributes.retry", "=", True),
        ("attributes.ratio", "<", 0.5),
        ("attributes.http.route", "contains", "/api/"),
        ("attributes.http.route", "starts-with", "/api"),
        ("attributes.http.route", "matches", "^/api/[a-z]+$"),
        ("resource.service.name", "=", "users"),
        ("resource.deployment.environment", "exists"),
        ("attributes.user.id", "not-exists"),
        ("name", "exists"),
    ],
)
def test_condition_matches(build, make_trace, condition) -> None:
    policy = rules_policy(build, rule("keep", condition))
    assert policy.evaluate(trace_of(make_trace, server_error_span()), 0) is Decision.SAMPLED


@pytest.mark.parametrize(
    "condition",
    [
        ("name", "=", "GET /"),
        ("kind", "=", "client"),
        ("status", "!=", "error"),
        ("duration_ms", ">", 1500),
        ("attributes.http.status_code", "=", "503"),  # a string is never equal to a number
        ("attributes.http.status_code", "contains", "50"),  # string operators read strings only
        ("attributes.http.route", "starts-with", "api"),
        ("attributes.http.route", "matches", "^/users"),
        # A missing field fails every operator but not-exists, != included.
        ("attributes.user.id", "!=", "42"),
        ("attributes.user.id", "exists"),
        ("resource.http.route", "exists"),  # span attributes are not resource attributes
        ("name", "not-exists"),
    ],
)
def test_condition_does_not_match(build, make_trace, condition) -> None:
    policy = rules_policy(build, rule("keep", condition))
    assert policy.evaluate(trace_of(make_trace, server_error_span()), 0) is Decision.NOT_SAMPLED


def test_first_matching_rule_wins(build, make_trace) -> None:
    policy = rules_policy(
        build,
        rule("drop", ("attributes.http.route", "=", "/health")),
        rule("keep", ("status", "=", "error")),
        rule("drop", ("resource.service.name", "=", "users")),
    )
    decide = policy.evaluate
    health_error = server_error_span(attributes={"http.route": "/health"})
    assert decide(trace_of(make_trace, health_error), 0) is Decision.DROPPED
    assert decide(trace_of(make_trace, server_error_span()), 0) is Decision.SAMPLED
    assert (
        decide(trace_of(make_trace, server_error_span(status=Status.STATUS_CODE_OK)), 0) is Decision.DROPPED
    )
    other_service = server_error_span(status=Status.STATUS_CODE_OK, resource={"service.name": "orders"})
    assert decide(trace_of(make_trace, other_service), 0) is Decision.NOT_SAMPLED


def test_span_scope_needs_one_span_meeting_every_condition(build, make_trace) -> None:
    policy = rules_policy(build, rule("keep", ("name", "=", "db"), ("status", "=", "error")))
    decide = policy.evaluate
    split = trace_of(
        make_trace, server_error_span(name="db", status=Status.STATUS_CODE_OK), server_error_span(name="web")
    )
    assert decide(split, 0) is Decision.NOT_SAMPLED
    together = trace_of(make_trace, server_error_span(name="web"), server_error_span(name="db"))
    assert decide(together, 0) is Decision.SAMPLED


def test_root_scope_reads_only_the_root_span(build, make_trace) -> None:
    policy = rules_policy(build, rule("keep", ("kind", "=", "server"), scope="root"))
    decide = policy.evaluate
    client_root = server_error_span(kind=Span.SPAN_KIND_CLIENT, parent=b"")
    server_child = server_error_span(kind=Span.SPAN_KIND_SERVER)
    assert decide(trace_of(make_trace, client_root, server_child), 0) is Decision.NOT_SAMPLED
    server_root = server_error_span(kind=Span.SPAN_KIND_SERVER, parent=bytes(8))
    assert decide(trace_of(make_trace, server_root, server_error_span(kind=Span.SPAN_KIND_CLIENT)), 0) is (
        Decision.SAMPLED
    )
    # No root span arrived: a root-scoped rule cannot match.
    assert decide(trace_of(make_trace, server_child), 0) is Decision.NOT_SAMPLED


class SpansNeverRead:
    """A trace view whose spans must not be parsed."""

    trace_id = bytes(16)
    span_count = 1

    def spans(self):
        raise AssertionError("spans() read")


def test_rule_without_conditions_catches_all_without_parsing_spans(build, make_trace) -> None:
    policy = rules_policy(build, {"action": "keep"}, rule("drop", ("name", "exists")))
    assert policy.evaluate(SpansNeverRead(), 0) is Decision.SAMPLED


def trace_ids(count: int) -> list[bytes]:
    generator = random.Random(20240611)
    return [generator.randbytes(16) for _ in range(count)]


def test_sample_rate_keeps_one_in_n_deterministically(build, make_trace) -> None:
    sample = rule("sample", ("status", "=", "error"), sample_rate=10, name="errors")
    policy = rules_policy(build, sample)
    again = rules_policy(build, sample)
    span = server_error_span()
    ids = trace_ids(10_000)
    kept = [
        trace_id
        for trace_id in ids
        if policy.evaluate(trace_of(make_trace, span, trace_id=trace_id), 0) is Decision.SAMPLED
    ]
    # Binomial(10,000, 1/10): standard deviation 30, so ±150 is five of them.
    assert abs(len(kept) - 1000) <= 150
    # Every node (another instance of the same config) keeps exactly the same traces.
    assert all(
        again.evaluate(trace_of(make_trace, span, trace_id=trace_id), 0) is Decision.SAMPLED
        for trace_id in kept
    )
    unkept = set(ids) - set(kept)
    assert all(
        again.evaluate(trace_of(make_trace, span, trace_id=trace_id), 0) is Decision.NOT_SAMPLED
        for trace_id in list(unkept)[:500]
    )


def test_each_rule_has_its_own_salt(build, make_trace) -> None:
    first = rules_policy(build, {"action": "sample", "sample_rate": 4, "name": "a"})
    second = rules_policy(build, {"action": "sample", "sample_rate": 4, "name": "b"})
    ids = trace_ids(2_000)

    def kept_by(policy) -> set[bytes]:
        traces = (trace_of(make_trace, server_error_span(), trace_id=trace_id) for trace_id in ids)
        return {trace.trace_id for trace in traces if policy.evaluate(trace, 0) is Decision.SAMPLED}

    by_first, by_second = kept_by(first), kept_by(second)
    # Independent draws of 1 in 4 overlap on about 1 in 16 (125 of 2,000), not on all 500.
    assert abs(len(by_first & by_second) - 125) <= 60


def test_keep_probability_is_that_of_the_matching_rule(build, make_trace) -> None:
    policy = rules_policy(
        build,
        rule("keep", ("name", "=", "checkout")),
        rule("sample", ("status", "=", "error"), sample_rate=20),
        {"action": "sample", "sample_rate": 1},
    )
    checkout = trace_of(make_trace, server_error_span(name="checkout"), trace_id=b"\x01" * 16)
    error = trace_of(make_trace, server_error_span(), trace_id=b"\x02" * 16)
    ok = trace_of(make_trace, server_error_span(status=Status.STATUS_CODE_OK), trace_id=b"\x03" * 16)
    policy.evaluate(checkout, 0)
    assert policy.keep_probability(checkout) == 1.0
    policy.evaluate(error, 0)
    assert policy.keep_probability(error) == 1 / 20
    # Asked about another trace than the last evaluated, the policy finds its rule again.
    assert policy.keep_probability(checkout) == 1.0
    assert policy.evaluate(ok, 0) is Decision.SAMPLED
    assert policy.keep_probability(ok) == 1.0


PREFIX = "tail_sampling.policies[0].rules.rules"


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        (
            [],
            "tail_sampling.policies[0].rules.rules: List should have at least 1 item after validation, not 0",
        ),
        (
            [rule("keep", ("name", "=", "a")), rule("keep", ("http.route", "=", "/"))],
            f"{PREFIX}[1].conditions[0].field: unknown field 'http.route' (known: name, kind, status, "
            "duration_ms, attributes.<key> or resource.<key>)",
        ),
        (
            [rule("keep", ("name", "~", "a"))],
            f"{PREFIX}[0].conditions[0].operator: Input should be '=', '!=', '>', '>=', '<', '<=', "
            "'contains', 'starts-with', 'exists', 'not-exists' or 'matches'",
        ),
        ([rule("keep", ("name", "="))], f"{PREFIX}[0].conditions[0]: operator = needs a value"),
        (
            [rule("keep", ("name", "=", ["a", "b"]))],
            f"{PREFIX}[0].conditions[0].value: must be a string, a number or a boolean",
        ),
        (
            [rule("keep", ("name", "exists", "x"))],
            f"{PREFIX}[0].conditions[0]: operator exists takes no value",
        ),
        (
            [rule("keep", ("kind", "contains", "serv"))],
            f"{PREFIX}[0].conditions[0]: operator contains compares strings: "
            "it needs a string field and a string value",
        ),
        (
            [rule("keep", ("kind", "=", "backend"))],
            f"{PREFIX}[0].conditions[0]: kind must be one of unspecified, internal, server, client, "
            "producer, consumer (or its number), not 'backend'",
        ),
        (
            [rule("keep", ("duration_ms", ">", "1s"))],
            f"{PREFIX}[0].conditions[0]: duration_ms compares with a number, not '1s'",
        ),
        (
            [rule("keep", ("name", "matches", "a("))],
            f"{PREFIX}[0].conditions[0]: not a valid regular expression 'a(': "
            "missing ), unterminated subpattern at position 1",
        ),
        (
            [rule("sample", ("name", "=", "a"))],
            f"{PREFIX}[0]: action sample needs sample_rate (keep 1 trace in sample_rate)",
        ),
        ([rule("keep", sample_rate=5)], f"{PREFIX}[0]: sample_rate applies to action sample, not keep"),
        (
            [rule("sample", sample_rate=0)],
            f"{PREFIX}[0].sample_rate: Input should be greater than or equal to 1",
        ),
        (
            [rule("discard")],
            f"{PREFIX}[0].action: Input should be 'keep', 'drop' or 'sample'",
        ),
        (
            [rule("keep", scope="trace")],
            f"{PREFIX}[0].scope: Input should be 'span' or 'root'",
        ),
        (
            [rule("keep", ("attributes.retries", ">", 10**30))],
            f"{PREFIX}[0].conditions[0]: integer {10**30} is out of the 64-bit range",
        ),
    ],
)
def test_bad_parameters(rules, message) -> None:
    spec = {"name": "rules", "type": "rules", "rules": {"rules": rules}}
    assert config_error(spec) == message
