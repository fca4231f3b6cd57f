"""The `rate_limiting` policy, a token bucket of spans, and the token bucket `bytes_limiting` shares."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class TokenBucket:
    """A bucket of `capacity` tokens refilled continuously at `rate` tokens per second.

    It starts full and a take either gets all the tokens it asks for or none, as the
    golang.org/x/time/rate limiter behind the OTel Collector's rate_limiting and bytes_limiting
    policies: a request larger than the capacity never succeeds.
    """

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self._last: float | None = None

    def take(self, tokens: int, now: float) -> bool:
        """Take `tokens` at time `now` (seconds, never decreasing) if the bucket holds that many."""
        if self._last is None:
            self._last = now
        elif now > self._last:
            self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate)
            self._last = now
        if tokens > self.tokens:
            return False
        self.tokens -= tokens
        return True


class TokenBucketPolicy:
    """Base of the limiting policies: a trace is kept when the bucket holds its cost, and takes it.

    The bucket holds `burst_capacity` tokens (twice the rate when 0, as in the OTel Collector),
    starts full and refills at `per_second` on the decider's clock; a trace costing more than the
    capacity is never kept, and a trace not kept takes nothing.
    """

    def __init__(self, name: str, per_second: int, burst_capacity: int) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.bucket = TokenBucket(per_second, burst_capacity or 2 * per_second)

    def admit(self, cost: int, now: float) -> Decision:
        """SAMPLED, taking `cost` tokens, when the bucket holds them; else NOT_SAMPLED."""
        return Decision.SAMPLED if self.bucket.take(cost, now) else Decision.NOT_SAMPLED


class RateLimitingParams(ParamsModel):
    spans_per_second: int = Field(gt=0)
    # 0 means unset, as in the OTel Collector: twice spans_per_second.
    burst_capacity: int = Field(default=0, ge=0)


class RateLimiting(TokenBucketPolicy):
    """Keeps traces while a token bucket of spans, refilled at `spans_per_second`, holds their spans."""

    type_name: ClassVar[str] = "rate_limiting"
    Params: ClassVar[type[ParamsModel]] = RateLimitingParams

    def __init__(self, name: str, params: RateLimitingParams, build_sub: SubPolicyBuilder) -> None:
        super().__init__(name, params.spans_per_second, params.burst_capacity)

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        return self.admit(trace.span_count, now)
