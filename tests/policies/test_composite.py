"""composite: sub-policies in policy_order, each with its share of the spans-per-second budget, per whole
second of the decider's clock; with spill_unused_budget, unused shares flow down the order."""

from __future__ import annotations

import pytest

from policies.base import STATUS_ERROR, Decision
from policies.registry import build_policies
from sampler.errors import ConfigError

ERRORS = {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}
SLOW = {"name": "slow", "type": "latency", "latency": {"threshold_ms": 100}}
EVERYTHING = {"name": "everything", "type": "always_sample"}
NOT_TEST = {
    "name": "not-test",
    "type": "string_attribute",
    "string_attribute": {"key": "env", "values": ["test"], "invert_match": True},
}


def composite(build, subs, allocation=None, order=None, total=100, **extra):
    block = {"max_total_spans_per_second": total, "composite_sub_policy": subs, **extra}
    if order is not None:
        block["policy_order"] = order
    if allocation is not None:
        block["rate_allocation"] = [
            {"policy": name, "percent": percent} for name, percent in allocation.items()
        ]
    return build({"name": "budget", "type": "composite", "composite": block})


def errors_first(build, errors: int, everything: int | None = None, **extra):
    """`errors` then `everything`, with these percents of 100 spans a second."""
    allocation = {"errors": errors} if everything is None else {"errors": errors, "everything": everything}
    return composite(build, [ERRORS, EVERYTHING], allocation, ["errors", "everything"], **extra)


def keeps(policy, trace, now: float, times: int) -> list[Decision]:
    return [policy.evaluate(trace, now) for _ in range(times)]


def error_trace(make_trace, spans: int = 10):
    return make_trace(span_count=spans, status_codes=STATUS_ERROR)


def test_budgets_follow_the_collectors_allocation(build) -> None:
    policy = composite(build, [ERRORS, SLOW, EVERYTHING], {"errors": 50, "slow": 25})
    # Without an allocation a sub-policy gets an equal share: 100 / 3, truncated.
    assert policy.budgets == (50, 25, 33)
    zero = composite(build, [ERRORS, SLOW], {"errors": 0, "slow": 29})
    # 0 means an equal share; 29% of 100 in float64 arithmetic is 28.999..., truncated as in Go.
    assert zero.budgets == (50, 28)


def test_a_sub_policy_keeps_until_its_share_of_the_second_is_used(build, make_trace) -> None:
    policy = errors_first(build, 50, 30)
    errors = error_trace(make_trace)
    assert keeps(policy, errors, 7.0, 5) == [Decision.SAMPLED] * 5
    # The errors share is used up: NOT_SAMPLED, without falling through to `everything`, which
    # still has room (the Collector's rule).
    assert policy.evaluate(errors, 7.5) is Decision.NOT_SAMPLED
    assert keeps(policy, make_trace(span_count=10), 7.9, 4) == [Decision.SAMPLED] * 3 + [Decision.NOT_SAMPLED]
    # A smaller trace can still fit what is left of a share.
    assert policy.evaluate(make_trace(span_count=10), 7.9) is Decision.NOT_SAMPLED
    # A new second starts every share afresh.
    assert policy.evaluate(errors, 8.0) is Decision.SAMPLED
    assert keeps(policy, make_trace(span_count=30), 8.2, 2) == [Decision.SAMPLED, Decision.NOT_SAMPLED]


def test_a_trace_no_sub_policy_samples_is_not_sampled(build, make_trace) -> None:
    policy = composite(build, [ERRORS, SLOW])
    assert policy.evaluate(make_trace(span_count=1, max_end_ns=10_000_000), 1.0) is Decision.NOT_SAMPLED


def test_policy_order_decides_which_share_pays(build, make_trace) -> None:
    # The Collector evaluates sub-policies in composite_sub_policy order whatever policy_order says;
    # tailgate follows policy_order.
    policy = composite(
        build, [EVERYTHING, ERRORS], {"errors": 20, "everything": 80}, ["errors", "everything"]
    )
    errors = error_trace(make_trace)
    assert keeps(policy, errors, 1.0, 3) == [Decision.SAMPLED, Decision.SAMPLED, Decision.NOT_SAMPLED]
    in_config_order = composite(build, [EVERYTHING, ERRORS], {"errors": 20, "everything": 80})
    assert keeps(in_config_order, errors, 1.0, 9) == [Decision.SAMPLED] * 8 + [Decision.NOT_SAMPLED]


def test_an_inverted_sample_counts_as_sampling(build, make_trace) -> None:
    policy = composite(build, [NOT_TEST], {"not-test": 100}, total=10)
    assert policy.evaluate(make_trace(span_count=5, attributes={"env": ["prod"]}), 1.0) is Decision.SAMPLED
    assert (
        policy.evaluate(make_trace(span_count=5, attributes={"env": ["test"]}), 1.0) is Decision.NOT_SAMPLED
    )
    assert policy.attribute_keys == frozenset({"env"})


def test_spill_unused_budget_flows_down_the_order(build, make_trace) -> None:
    plain = errors_first(build, 50, 50)
    spilling = errors_first(build, 50, 50, spill_unused_budget=True)
    ok = make_trace(span_count=10)
    # No errors this second: without spilling `everything` keeps its own 50 spans only ...
    assert keeps(plain, ok, 3.0, 10).count(Decision.SAMPLED) == 5
    # ... with spilling it may use what `errors` has not used: the whole 100.
    assert keeps(spilling, ok, 3.0, 11) == [Decision.SAMPLED] * 10 + [Decision.NOT_SAMPLED]
    # What was spilled and used is gone for `errors` until the next second.
    assert spilling.evaluate(error_trace(make_trace), 3.5) is Decision.NOT_SAMPLED
    assert spilling.evaluate(error_trace(make_trace), 4.0) is Decision.SAMPLED


def test_spilled_budget_never_flows_up_the_order(build, make_trace) -> None:
    policy = errors_first(build, 30, 70, spill_unused_budget=True)
    errors = error_trace(make_trace)
    # `everything` has used nothing of its 70 spans, but they are not open to `errors`, before it.
    assert keeps(policy, errors, 1.0, 4) == [Decision.SAMPLED] * 3 + [Decision.NOT_SAMPLED]
    # They are still all there for `everything`.
    assert keeps(policy, make_trace(span_count=10), 1.0, 8) == [Decision.SAMPLED] * 7 + [Decision.NOT_SAMPLED]


def test_spilling_keeps_room_an_earlier_sub_policy_did_not_lend(build, make_trace) -> None:
    policy = errors_first(build, 50, 50, spill_unused_budget=True)
    assert keeps(policy, make_trace(span_count=10), 2.0, 7) == [Decision.SAMPLED] * 7
    # `everything` borrowed 20 of the 50 errors spans: 30 are left for errors.
    assert keeps(policy, error_trace(make_trace), 2.1, 4) == [Decision.SAMPLED] * 3 + [Decision.NOT_SAMPLED]


def test_the_total_caps_default_shares_that_add_up_to_more(build, make_trace) -> None:
    # errors 80% plus an equal share (50) for `everything` would allow 130 spans a second.
    policy = errors_first(build, 80)
    assert policy.budgets == (80, 50)
    assert keeps(policy, error_trace(make_trace), 1.0, 8) == [Decision.SAMPLED] * 8
    assert keeps(policy, make_trace(span_count=10), 1.0, 3) == [Decision.SAMPLED] * 2 + [Decision.NOT_SAMPLED]


PREFIX = "tail_sampling.policies[0].composite"


@pytest.mark.parametrize(
    ("block", "messages"),
    [
        (
            {"policy_order": ["errors", "slo", "everything"]},
            [
                f"{PREFIX}.policy_order[1]: unknown sub-policy 'slo' (known: errors, slow, everything)",
                f"{PREFIX}.policy_order: must list every sub-policy; missing 'slow'",
            ],
        ),
        (
            {"policy_order": ["errors", "slow", "errors"]},
            [
                f"{PREFIX}.policy_order[2]: 'errors' is listed twice",
                f"{PREFIX}.policy_order: must list every sub-policy; missing 'everything'",
            ],
        ),
        (
            {"policy_order": []},
            [f"{PREFIX}.policy_order: List should have at least 1 item after validation, not 0"],
        ),
        (
            {"rate_allocation": [{"policy": "error", "percent": 10}]},
            [
                f"{PREFIX}.rate_allocation[0].policy: unknown sub-policy 'error' "
                "(known: errors, slow, everything)"
            ],
        ),
        (
            {"rate_allocation": [{"policy": "errors", "percent": 60}, {"policy": "slow", "percent": 50}]},
            [f"{PREFIX}.rate_allocation: percents add up to 110, more than 100"],
        ),
        (
            {"rate_allocation": [{"policy": "slow", "percent": 10}, {"policy": "slow", "percent": 20}]},
            [f"{PREFIX}.rate_allocation[1].policy: 'slow' has more than one allocation"],
        ),
        (
            {"rate_allocation": [{"policy": "slow", "percent": 101}]},
            [f"{PREFIX}.rate_allocation[0].percent: Input should be less than or equal to 100"],
        ),
        (
            {"composite_sub_policy": []},
            [f"{PREFIX}.composite_sub_policy: List should have at least 1 item after validation, not 0"],
        ),
        (
            {"max_total_spans_per_second": 0},
            [f"{PREFIX}.max_total_spans_per_second: Input should be greater than 0"],
        ),
        (
            {
                "composite_sub_policy": [
                    ERRORS,
                    {"name": "slow", "type": "latency", "latency": {"threshold_ms": -1}},
                ]
            },
            [
                f"{PREFIX}.composite_sub_policy[1].latency.threshold_ms: "
                "Input should be greater than or equal to 0"
            ],
        ),
    ],
)
def test_bad_parameters(block, messages) -> None:
    params = {"max_total_spans_per_second": 100, "composite_sub_policy": [ERRORS, SLOW, EVERYTHING], **block}
    spec = {"name": "budget", "type": "composite", "composite": params}
    with pytest.raises(ConfigError) as caught:
        build_policies([spec], "tail_sampling.policies")
    assert str(caught.value).splitlines() == messages
