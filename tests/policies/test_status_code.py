"""status_code: keeps traces with a span whose status is one of the configured codes."""

from __future__ import annotations

import pytest

from policies.base import STATUS_ERROR, STATUS_OK, STATUS_UNSET, Decision
from tests.policies.conftest import config_error


def status_policy(build, *codes: str):
    return build({"name": "s", "type": "status_code", "status_code": {"status_codes": list(codes)}})


def test_error_matches_a_trace_with_an_error_span(build, make_trace) -> None:
    policy = status_policy(build, "ERROR")
    assert policy.evaluate(make_trace(status_codes=STATUS_OK | STATUS_ERROR), 0) is Decision.SAMPLED


def test_error_does_not_match_a_trace_without_errors(build, make_trace) -> None:
    policy = status_policy(build, "ERROR")
    trace = make_trace(status_codes=STATUS_OK | STATUS_UNSET)
    assert policy.evaluate(trace, 0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(status_codes=0), 0) is Decision.NOT_SAMPLED


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (STATUS_OK, Decision.SAMPLED),
        (STATUS_UNSET, Decision.SAMPLED),
        (STATUS_ERROR, Decision.NOT_SAMPLED),
    ],
)
def test_any_of_several_codes(build, make_trace, bits, expected) -> None:
    policy = status_policy(build, "OK", "UNSET")
    assert policy.evaluate(make_trace(status_codes=bits), 0) is expected


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"status_codes": ["ERROR", "FAILED"]},
            "tail_sampling.policies[0].status_code.status_codes[1]: Input should be 'OK', 'ERROR' or 'UNSET'",
        ),
        (
            {"status_codes": []},
            "tail_sampling.policies[0].status_code.status_codes: "
            "List should have at least 1 item after validation, not 0",
        ),
        (None, "tail_sampling.policies[0].status_code.status_codes: Field required"),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "s", "type": "status_code"}
    if block is not None:
        spec["status_code"] = block
    assert config_error(spec) == message
