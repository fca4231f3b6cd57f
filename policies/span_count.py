"""The `span_count` policy: keeps traces whose number of spans lies within bounds."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class SpanCountParams(ParamsModel):
    min_spans: int = Field(default=0, ge=0)
    # 0 means no upper bound, as in the OTel Collector.
    max_spans: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> SpanCountParams:
        if not self.model_fields_set & {"min_spans", "max_spans"}:
            raise ValueError("at least one of min_spans or max_spans must be set")
        low, high = self.min_spans, self.max_spans
        if high and low > high:
            raise ValueError(f"min_spans ({low}) must not exceed max_spans ({high})")
        return self


class SpanCount:
    """Samples a trace with min_spans <= span count <= max_spans (inclusive; no upper bound when 0)."""

    type_name: ClassVar[str] = "span_count"
    Params: ClassVar[type[ParamsModel]] = SpanCountParams

    def __init__(self, name: str, params: SpanCountParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.min_spans = params.min_spans
        self.max_spans: float = params.max_spans or float("inf")

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        if self.min_spans <= trace.span_count <= self.max_spans:
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED
