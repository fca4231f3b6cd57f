"""ottl_condition: the supported OTTL subset on spans and span events, error_mode, and config errors
that quote the unsupported expression."""

from __future__ import annotations

import logging

import pytest

from policies.base import Decision
from policies.conditions import ConditionError
from policies.registry import build_policies
from sampler.errors import ConfigError
from tests.policies.test_conditions import server_error_span, span_record, trace_of


def ottl_policy(build, *span: str, spanevent: tuple[str, ...] = (), **options):
    block = {"span": list(span), "spanevent": list(spanevent), **options}
    return build({"name": "ottl", "type": "ottl_condition", "ottl_condition": block})


MATCHING = [
    'attributes["http.route"] == "/api/users"',
    'resource.attributes["service.name"] == "users"',
    'name == "GET /api/users"',
    "kind == SPAN_KIND_SERVER",
    "kind == 2",
    "status.code == STATUS_CODE_ERROR",
    "status.code != STATUS_CODE_OK",
    "end_time_unix_nano - start_time_unix_nano > 1000000000",
    "(end_time_unix_nano - start_time_unix_nano) / 1000000 >= 1500",
    'attributes["http.status_code"] >= 500 and attributes["http.status_code"] < 600',
    'attributes["http.status_code"] == 503.0',
    '500 < attributes["http.status_code"]',
    'attributes["retry"] == true',
    'attributes["ratio"] <= 0.25',
    'attributes["missing"] == nil',
    'not (name == "GET /" or kind == SPAN_KIND_CLIENT)',
    'name == "nope" or resource.attributes["deployment.environment"] == "prod"',
    'IsMatch(name, "^GET /api/")',
    'IsMatch(attributes["http.status_code"], "^5\\\\d\\\\d$")',
    'span.name == "GET /api/users" and instrumentation_scope.name == "lib"',
    "true",
]
NOT_MATCHING = [
    'attributes["http.route"] == "/cart"',
    'attributes["http.status_code"] == "503"',  # a string is never equal to an int
    'attributes["http.status_code"] < "600"',
    'attributes["missing"] != nil',
    'attributes["missing"] > 0',
    "kind == SPAN_KIND_CLIENT",
    "end_time_unix_nano - start_time_unix_nano > 2000000000",
    'not IsMatch(name, "users")',
    'name == "GET /api/users" and status.code == STATUS_CODE_OK',
    "false",
]


@pytest.mark.parametrize(
    ("condition", "decision"),
    [(condition, Decision.SAMPLED) for condition in MATCHING]
    + [(condition, Decision.NOT_SAMPLED) for condition in NOT_MATCHING],
)
def test_span_condition(build, make_trace, condition, decision) -> None:
    policy = ottl_policy(build, condition)
    assert policy.evaluate(trace_of(make_trace, server_error_span()), 0) is decision


def test_any_span_meeting_any_condition_samples(build, make_trace) -> None:
    policy = ottl_policy(build, 'name == "a"', 'name == "b"')
    assert policy.evaluate(trace_of(make_trace, span_record("x"), span_record("b")), 0) is (Decision.SAMPLED)
    assert policy.evaluate(trace_of(make_trace, span_record("x"), span_record("y")), 0) is (
        Decision.NOT_SAMPLED
    )
    assert policy.evaluate(trace_of(make_trace), 0) is Decision.NOT_SAMPLED


def test_span_event_conditions(build, make_trace) -> None:
    policy = ottl_policy(
        build,
        spanevent=(
            'name == "exception" and attributes["exception.type"] == "TimeoutError" '
            'and span.name == "GET /api/users" and resource.attributes["service.name"] == "users"',
        ),
    )
    assert policy.evaluate(trace_of(make_trace, server_error_span()), 0) is Decision.SAMPLED
    no_timeout = server_error_span(events=(("exception", {"exception.type": "KeyError"}),))
    assert policy.evaluate(trace_of(make_trace, no_timeout), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(trace_of(make_trace, server_error_span(events=())), 0) is Decision.NOT_SAMPLED


def test_span_and_span_event_conditions_together(build, make_trace) -> None:
    policy = ottl_policy(build, 'name == "slow"', spanevent=('name == "retry"',))
    only_event = span_record("fast", events=(("retry", {}),))
    assert policy.evaluate(trace_of(make_trace, span_record("fast"), only_event), 0) is Decision.SAMPLED
    assert policy.evaluate(trace_of(make_trace, span_record("slow")), 0) is Decision.SAMPLED
    assert policy.evaluate(trace_of(make_trace, span_record("fast")), 0) is Decision.NOT_SAMPLED


def test_negation_of_a_missing_attribute(build, make_trace) -> None:
    # OTTL: nil != "test" holds, so a span without the attribute matches the negated condition.
    policy = ottl_policy(build, 'not (resource.attributes["env"] == "test")')
    assert policy.evaluate(trace_of(make_trace, span_record(resource={"env": "prod"})), 0) is (
        Decision.SAMPLED
    )
    assert policy.evaluate(trace_of(make_trace, span_record()), 0) is Decision.SAMPLED
    assert policy.evaluate(trace_of(make_trace, span_record(resource={"env": "test"})), 0) is (
        Decision.NOT_SAMPLED
    )


def test_string_escapes(build, make_trace) -> None:
    policy = ottl_policy(build, 'name == "say \\"hi\\"\\t\\u00e9"')
    assert policy.evaluate(trace_of(make_trace, span_record('say "hi"\té')), 0) is Decision.SAMPLED


def test_error_mode_propagate_fails_the_policy(build, make_trace) -> None:
    # Math on a missing attribute is an evaluation error in OTTL.
    policy = ottl_policy(build, 'attributes["retries"] + 1 > 3', 'name == "op"')
    with pytest.raises(ConditionError, match="cannot compute None \\+ 1"):
        policy.evaluate(trace_of(make_trace, span_record()), 0)


@pytest.mark.parametrize("mode", ["ignore", "silent"])
def test_error_modes_ignore_and_silent_count_the_condition_false(build, make_trace, caplog, mode) -> None:
    policy = ottl_policy(build, 'attributes["retries"] + 1 > 3', 'name == "op"', error_mode=mode)
    with caplog.at_level(logging.WARNING, logger="policies.ottl_condition"):
        assert policy.evaluate(trace_of(make_trace, span_record("op")), 0) is Decision.SAMPLED
        assert policy.evaluate(trace_of(make_trace, span_record("other")), 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(trace_of(make_trace, span_record(attributes={"retries": 3})), 0) is (
        Decision.SAMPLED
    )
    logged = [record.getMessage() for record in caplog.records]
    if mode == "silent":
        assert logged == []
    else:  # once per throttle interval
        assert logged == [
            "policy 'ottl': OTTL condition 'attributes[\"retries\"] + 1 > 3' failed: "
            "cannot compute None + 1: both must be int, or both float"
        ]


def test_integer_division_truncates_and_mixing_types_fails(build, make_trace) -> None:
    policy = ottl_policy(build, 'attributes["n"] / 2 == -3', error_mode="silent")
    assert policy.evaluate(trace_of(make_trace, span_record(attributes={"n": -7})), 0) is Decision.SAMPLED
    assert policy.evaluate(trace_of(make_trace, span_record(attributes={"n": -7.0})), 0) is (
        Decision.NOT_SAMPLED
    )


PREFIX = "tail_sampling.policies[0].ottl_condition"


def config_error(block: dict) -> str:
    spec = {"name": "ottl", "type": "ottl_condition", "ottl_condition": block}
    with pytest.raises(ConfigError) as caught:
        build_policies([spec], "tail_sampling.policies")
    return str(caught.value)


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ('Concat([name, "x"], "") == "ax"', "unknown function Concat"),
        ("trace_id == 0x01", "unsupported path trace_id"),
        ('attributes["a"]["b"] == 1', "nested keys are not supported (attributes)"),
        ("attributes[0] == 1", "only string keys are supported, found '0'"),
        ("name", "expected a comparison operator, found end of expression"),
        ('name == "a" and', "unexpected end of expression"),
        ('name = "a"', "unexpected character '=' at position 5"),
        ('name == "a', "unterminated string at position 8"),
        ('name == "\\q"', 'unknown escape sequence \\q in string "\\q"'),
        ("kind == SPAN_KIND_SERVERS", "unknown enum SPAN_KIND_SERVERS"),
        ('name + 1 > "a" - 1', "math on 'a' (only numbers)"),
        (f'attributes["x"] > {10**400}', f"integer {10**400} is out of the 64-bit range"),
        (f'attributes["x"] + -{2**63 + 1} > 0', f"integer -{2**63 + 1} is out of the 64-bit range"),
        (
            'IsMatch(name, "(")',
            "IsMatch: not a valid regular expression '(': missing ), unterminated subpattern at position 0",
        ),
    ],
)
def test_unsupported_expressions_are_quoted(expression, reason) -> None:
    message = config_error({"span": ["true", expression]})
    assert message == f"{PREFIX}.span[1]: unsupported OTTL expression '{expression}': {reason}"


def test_unsupported_expression_examples() -> None:
    assert config_error({"span": ['name == "a"', "foo(bar)"]}) == (
        f"{PREFIX}.span[1]: unsupported OTTL expression 'foo(bar)': unknown function foo"
    )
    # In span event conditions plain paths are the event's, which has no status.
    assert config_error({"spanevent": ["status.code == 2"]}) == (
        f"{PREFIX}.spanevent[0]: unsupported OTTL expression 'status.code == 2': unsupported path status.code"
    )


def test_bad_parameters() -> None:
    assert config_error({}) == f"{PREFIX}: expected at least one OTTL condition in span or spanevent"
    assert config_error({"span": ["true"], "error_mode": "panic"}) == (
        f"{PREFIX}.error_mode: Input should be 'propagate', 'ignore' or 'silent'"
    )
    assert config_error({"span": "true"}) == f"{PREFIX}.span: Input should be a valid list"
