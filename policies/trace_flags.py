"""The `trace_flags` policy: keeps traces with a span whose W3C trace flags have the sampled bit set."""

from __future__ import annotations

from typing import ClassVar

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView

# OTLP Span.flags carries the W3C trace flags in its low 8 bits; bit 0 is "sampled".
SAMPLED_FLAG = 0x01


class TraceFlagsParams(ParamsModel):
    """`trace_flags` takes no parameters, as in the OTel Collector."""


class TraceFlags:
    """Samples a trace when any of its spans was sampled upstream (the W3C sampled flag is set)."""

    type_name: ClassVar[str] = "trace_flags"
    Params: ClassVar[type[ParamsModel]] = TraceFlagsParams

    def __init__(self, name: str, params: TraceFlagsParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        if any(record.span.flags & SAMPLED_FLAG for record in trace.spans()):
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED
