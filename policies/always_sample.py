"""The `always_sample` policy: keeps every trace."""

from __future__ import annotations

from typing import ClassVar

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class AlwaysSampleParams(ParamsModel):
    """`always_sample` takes no parameters; an empty block is accepted as in the OTel Collector."""


class AlwaysSample:
    """Samples every trace."""

    type_name: ClassVar[str] = "always_sample"
    Params: ClassVar[type[ParamsModel]] = AlwaysSampleParams

    def __init__(self, name: str, params: AlwaysSampleParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        return Decision.SAMPLED
