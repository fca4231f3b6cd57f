"""The `drop` policy: drops a trace outright when all of its sub-policies match it."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView, build_sub_policies

_NOT_MATCHING = frozenset({Decision.NOT_SAMPLED, Decision.INVERT_NOT_SAMPLED})


class DropParams(ParamsModel):
    # Items are checked by the registry as each sub-policy is built, with their own key paths.
    drop_sub_policy: list[Any] = Field(min_length=1)


class Drop:
    """DROPPED when no sub-policy says NOT_SAMPLED or INVERT_NOT_SAMPLED, else NOT_SAMPLED.

    As in the OTel Collector, a sub-policy matches with any other decision (SAMPLED,
    INVERT_SAMPLED, DROPPED), and sub-policies run in order and stop at the first that does not
    match. A DROPPED decision drops the trace whatever the other policies say; a `drop` policy is
    recognised by `type_name == "drop"` (or isinstance) so that it can be evaluated first.
    """

    type_name: ClassVar[str] = "drop"
    Params: ClassVar[type[ParamsModel]] = DropParams

    def __init__(self, name: str, params: DropParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.sub_policies = build_sub_policies(params.drop_sub_policy, "drop_sub_policy", build_sub)
        self.attribute_keys = frozenset().union(*(sub.attribute_keys for sub in self.sub_policies))

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        for sub in self.sub_policies:
            if sub.evaluate(trace, now) in _NOT_MATCHING:
                return Decision.NOT_SAMPLED
        return Decision.DROPPED
