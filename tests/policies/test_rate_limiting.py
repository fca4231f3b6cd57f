"""rate_limiting: spans kept per whole second of the decider's clock stay below the limit."""

from __future__ import annotations

import pytest

from policies.base import Decision
from policies.registry import build_policies
from sampler.errors import ConfigError


def limiter(build, spans_per_second: int):
    block = {"spans_per_second": spans_per_second}
    return build({"name": "rl", "type": "rate_limiting", "rate_limiting": block})


def test_keeps_until_the_second_is_full_then_resets(build, make_trace) -> None:
    policy = limiter(build, 10)
    decide = policy.evaluate
    assert decide(make_trace(span_count=4), 100.1) is Decision.SAMPLED  # 4
    assert decide(make_trace(span_count=5), 100.5) is Decision.SAMPLED  # 9
    # 9 + 1 is not below 10: rejected, and not counted.
    assert decide(make_trace(span_count=1), 100.9) is Decision.NOT_SAMPLED
    assert decide(make_trace(span_count=1), 100.99) is Decision.NOT_SAMPLED
    # A new second starts a new count.
    assert decide(make_trace(span_count=9), 101.0) is Decision.SAMPLED
    assert decide(make_trace(span_count=1), 101.5) is Decision.NOT_SAMPLED


def test_a_trace_at_the_limit_is_never_kept(build, make_trace) -> None:
    policy = limiter(build, 10)
    assert policy.evaluate(make_trace(span_count=10), 5.0) is Decision.NOT_SAMPLED
    assert policy.evaluate(make_trace(span_count=9), 5.0) is Decision.SAMPLED


def test_each_policy_has_its_own_window(build, make_trace) -> None:
    first, second = limiter(build, 5), limiter(build, 5)
    assert first.evaluate(make_trace(span_count=4), 1.0) is Decision.SAMPLED
    assert second.evaluate(make_trace(span_count=4), 1.0) is Decision.SAMPLED


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"spans_per_second": 0},
            "tail_sampling.policies[0].rate_limiting.spans_per_second: Input should be greater than 0",
        ),
        (None, "tail_sampling.policies[0].rate_limiting.spans_per_second: Field required"),
        ([100], "tail_sampling.policies[0].rate_limiting: must be a mapping"),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "rl", "type": "rate_limiting"}
    if block is not None:
        spec["rate_limiting"] = block
    with pytest.raises(ConfigError) as caught:
        build_policies([spec], "tail_sampling.policies")
    assert str(caught.value) == message
