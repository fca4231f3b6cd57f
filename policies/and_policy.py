"""The `and` policy: keeps a trace only when every one of its sub-policies would."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView, build_sub_policies

_PASSING = frozenset({Decision.SAMPLED, Decision.INVERT_SAMPLED})


class AndParams(ParamsModel):
    # Items are checked by the registry as each sub-policy is built, with their own key paths.
    and_sub_policy: list[Any] = Field(min_length=1)


class And:
    """SAMPLED when every sub-policy says SAMPLED or INVERT_SAMPLED, else NOT_SAMPLED.

    Sub-policies run in order and stop at the first that does not pass (as in the OTel Collector),
    so a stateful sub-policy such as rate_limiting placed last only counts traces the others let
    through.
    """

    type_name: ClassVar[str] = "and"
    Params: ClassVar[type[ParamsModel]] = AndParams

    def __init__(self, name: str, params: AndParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        # Every sub-policy is built before failing, so one error report lists all of their problems.
        self.sub_policies = build_sub_policies(params.and_sub_policy, "and_sub_policy", build_sub)
        subs = self.sub_policies
        self.attribute_keys = frozenset().union(*(sub.attribute_keys for sub in subs))

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        for sub in self.sub_policies:
            if sub.evaluate(trace, now) not in _PASSING:
                return Decision.NOT_SAMPLED
        return Decision.SAMPLED
