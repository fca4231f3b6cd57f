"""The `rate_limiting` policy: keeps traces while the spans kept this second stay under a limit."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class RateLimitingParams(ParamsModel):
    spans_per_second: int = Field(gt=0)


class RateLimiting:
    """The Collector's per-second window: a trace is kept if, with its spans, the spans kept in the
    current whole second (of the decider's clock) stay below `spans_per_second`.

    Recent Collector releases replaced this window with a token bucket (burst of twice the rate);
    tailgate keeps the window, whose behaviour is simpler to predict and to test.
    """

    type_name: ClassVar[str] = "rate_limiting"
    Params: ClassVar[type[ParamsModel]] = RateLimitingParams

    def __init__(self, name: str, params: RateLimitingParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.spans_per_second = params.spans_per_second
        self._second: int | None = None
        self._spans_in_second = 0

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        second = int(now)
        if second != self._second:
            self._second = second
            self._spans_in_second = 0
        spans = self._spans_in_second + trace.span_count
        if spans < self.spans_per_second:
            self._spans_in_second = spans
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED
