"""The `not` policy: turns its sub-policy's sampled into not sampled and the other way round."""

from __future__ import annotations

from typing import Any, ClassVar

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView

_OPPOSITE = {Decision.SAMPLED: Decision.NOT_SAMPLED, Decision.NOT_SAMPLED: Decision.SAMPLED}


class NotParams(ParamsModel):
    # One policy (a mapping, not a list), checked by the registry as the sub-policy is built.
    not_sub_policy: Any


class Not:
    """SAMPLED when the sub-policy says NOT_SAMPLED and NOT_SAMPLED when it says SAMPLED.

    Any other decision (INVERT_SAMPLED, INVERT_NOT_SAMPLED, DROPPED) passes through unchanged, as
    in the OTel Collector: `not` around an `invert_match` policy does not invert it back.
    """

    type_name: ClassVar[str] = "not"
    Params: ClassVar[type[ParamsModel]] = NotParams

    def __init__(self, name: str, params: NotParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.sub_policy = build_sub(params.not_sub_policy, "not_sub_policy")
        self.attribute_keys = self.sub_policy.attribute_keys

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        decision = self.sub_policy.evaluate(trace, now)
        return _OPPOSITE.get(decision, decision)
