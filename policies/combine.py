"""The final verdict on a trace from its per-policy decisions, as the OTel Collector takes it."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from policies.base import Decision


def combine(decisions: Collection[Decision]) -> bool:
    """Whether to keep a trace, given the decisions of all policies (in any order).

    As the Collector: a DROPPED decision drops the trace, then any INVERT_NOT_SAMPLED drops it, then
    any SAMPLED keeps it; INVERT_SAMPLED keeps it only when no policy said NOT_SAMPLED (an inverted
    match alone does not override a plain "no"); anything else drops it.
    """
    if Decision.DROPPED in decisions or Decision.INVERT_NOT_SAMPLED in decisions:
        return False
    if Decision.SAMPLED in decisions:
        return True
    return Decision.INVERT_SAMPLED in decisions and Decision.NOT_SAMPLED not in decisions


def deciding_policy(decisions: Sequence[Decision]) -> int | None:
    """Index of the policy the Collector records as `tailsampling.policy` on a kept trace.

    That is the first policy that said SAMPLED or, when none did, the first that said
    INVERT_SAMPLED; None when the trace is not kept.
    """
    if not combine(decisions):
        return None
    for wanted in (Decision.SAMPLED, Decision.INVERT_SAMPLED):
        for index, decision in enumerate(decisions):
            if decision is wanted:
                return index
    return None
