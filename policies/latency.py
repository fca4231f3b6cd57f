"""The `latency` policy: keeps traces by duration, first span start to last span end."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, ValidationInfo, field_validator

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class LatencyParams(ParamsModel):
    threshold_ms: int = Field(ge=0)
    # 0 means unset, as in the OTel Collector, so its configs carry over unchanged.
    upper_threshold_ms: int | None = Field(default=None, ge=0)

    @field_validator("upper_threshold_ms")
    @classmethod
    def _above_threshold(cls, value: int | None, info: ValidationInfo) -> int | None:
        threshold = info.data.get("threshold_ms")
        if value and threshold is not None and value <= threshold:
            raise ValueError(f"must be greater than threshold_ms ({threshold})")
        return value


class Latency:
    """Samples on the whole trace's duration, in whole milliseconds (truncated).

    Without `upper_threshold_ms` a trace is kept when duration >= threshold_ms; with it, when
    threshold_ms < duration <= upper_threshold_ms, as in the OTel Collector. Deliberate difference:
    the Collector grows a running min start / max end span by span and stops at the first span
    where the condition holds, so with an upper bound its verdict can depend on span order;
    tailgate always uses the duration of the whole trace, which is order independent.
    """

    type_name: ClassVar[str] = "latency"
    Params: ClassVar[type[ParamsModel]] = LatencyParams

    def __init__(self, name: str, params: LatencyParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.threshold_ms = params.threshold_ms
        self.upper_threshold_ms = params.upper_threshold_ms or None

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        duration_ms = max(trace.max_end_ns - trace.min_start_ns, 0) // 1_000_000
        upper = self.upper_threshold_ms
        if upper is None:
            sampled = duration_ms >= self.threshold_ms
        else:
            sampled = self.threshold_ms < duration_ms <= upper
        return Decision.SAMPLED if sampled else Decision.NOT_SAMPLED
