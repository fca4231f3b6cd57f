"""`route_latency`: keep a trace when it is slower than the threshold of its HTTP route.

An example of a tailgate policy plugin: a class with `type_name`, a `Params` model, a constructor
`(name, params, build_sub)`, `name` and `attribute_keys` attributes and `evaluate(trace, now)`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView

ROUTE = "http.route"


class RouteLatencyParams(ParamsModel):
    # Route → threshold in milliseconds; routes not listed use `default_ms`.
    routes: dict[str, int] = Field(default_factory=dict)
    default_ms: int = Field(default=1000, gt=0)


class RouteLatency:
    """SAMPLED when the trace's duration reaches the threshold of any route its spans served."""

    type_name: ClassVar[str] = "route_latency"
    Params: ClassVar[type[ParamsModel]] = RouteLatencyParams

    def __init__(self, name: str, params: RouteLatencyParams, build_sub: SubPolicyBuilder) -> None:
        if any(threshold <= 0 for threshold in params.routes.values()):
            raise ValueError("routes: every threshold must be a positive number of milliseconds")
        self.name = name
        # Keys listed here are extracted from spans and resources as they arrive.
        self.attribute_keys = frozenset({ROUTE})
        self._thresholds_ns = {route: ms * 1_000_000 for route, ms in params.routes.items()}
        self._default_ns = params.default_ms * 1_000_000

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        duration = trace.max_end_ns - trace.min_start_ns
        routes = [value for value in trace.attribute_values(ROUTE) if isinstance(value, str)]
        thresholds = [self._thresholds_ns.get(route, self._default_ns) for route in routes]
        if duration >= min(thresholds, default=self._default_ns):
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED
