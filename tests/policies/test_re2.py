"""RE2 patterns (as the OTel Collector and Refinery read them) matched with Python's `re`."""

from __future__ import annotations

import re

import pytest

from policies.base import Decision
from policies.re2 import translate
from tests.policies.test_conditions import span_record


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        (r"^[[:digit:]]+$", "12345", True),  # re alone reads [[:digit:]] as a set of ":dgit" and "["
        (r"^[[:digit:]]+$", "12a", False),
        (r"^/api/v[[:digit:]]/", "/api/v2/users", True),
        (r"^[a[:digit:]_]+$", "a5_", True),
        (r"^[a[:digit:]_]+$", "b", False),
        (r"^[[:^digit:]]+$", "abc", True),
        (r"^[[:^digit:]]+$", "a1", False),
        (r"^[[:alpha:][:space:]]+$", "ab c", True),
        (r"[[:punct:]]", "!", True),
        (r"[[:xdigit:]]{2}", "fF", True),
        (r"[]a]", "]", True),
        (r"^/health$", "/health\n", False),  # RE2's $ is the end of the text
        (r"^/health$", "/health", True),
        (r"(?m)^a$", "a\nb", True),
        (r"^/health\z", "/health", True),
        (r"^/health\z", "/health\n", False),
        (r"\Q.*+\E$", "a.*+", True),
        (r"\Q.*+\E", "aaa", False),
        (r"(?<id>\d+)", "x42", True),
        (r"[$]", "$", True),
        (r"^a\(?m$", "a(m\n", False),  # an escaped "(?m" is text, not multi-line mode
        (r"[(?m]x$", "x\n", False),
        (r"(?m:^a$)|^b$", "a\nc", True),  # multi-line inside the group
        (r"(?m:^a$)|^b$", "b\n", False),  # not outside it
        (r"(?i)^abc$", "ABC", True),
        (r"^\d+$", "\u0661\u0662", False),  # RE2's \d is ASCII; re's takes any Unicode digit
        (r"^\d+$", "12", True),
        (r"^\w+$", "\u00e9", False),
        (r"^\s$", "\u00a0", False),
        (r"^\s$", "\v", False),  # not in RE2's \s
        (r"^\S+$", "ab", True),
        (r"^[\d_]+$", "1_2", True),
        (r"^a{,2}$", "a{,2}", True),  # RE2 reads {,2} as text
        (r"^a{,2}$", "aa", False),
        (r"^(?P<x>a)(?:b)(?=c)", "abc", True),
    ],
)
def test_re2_patterns_match_as_in_re2(pattern: str, value: str, matches: bool) -> None:
    assert (re.search(translate(pattern), value) is not None) is matches


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"[[:bogus:]]", "unknown POSIX class [:bogus:]"),
        (r"[a[:^digit:]]", "[:^digit:] is supported only as a class of its own"),
        (r"(a)\1", "backreferences are not RE2"),
        (r"[\Da]", "\\D inside a class is not supported"),
    ],
)
def test_posix_classes_re2_does_not_read_so_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        translate(pattern)


def test_string_attribute_and_ottl_ismatch_read_re2(build, make_trace) -> None:
    routes = build(
        {
            "name": "routes",
            "type": "string_attribute",
            "string_attribute": {
                "key": "http.route",
                "values": ["^/api/v[[:digit:]]/"],
                "enabled_regex_matching": True,
            },
        }
    )
    assert routes.evaluate(make_trace(attributes={"http.route": ["/api/v2/users"]}), 0) is Decision.SAMPLED
    assert (
        routes.evaluate(make_trace(attributes={"http.route": ["/api/vx/users"]}), 0) is Decision.NOT_SAMPLED
    )
    ottl = build(
        {
            "name": "ottl",
            "type": "ottl_condition",
            "ottl_condition": {"span": ['IsMatch(name, "^GET /[[:alpha:]]+$")']},
        }
    )
    assert ottl.evaluate(make_trace(records=[span_record("GET /users")]), 0) is Decision.SAMPLED
    assert ottl.evaluate(make_trace(records=[span_record("GET /users\n")]), 0) is Decision.NOT_SAMPLED
