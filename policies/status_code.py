"""The `status_code` policy: keeps traces with a span whose status is one of the given codes."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from policies.base import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_UNSET,
    Decision,
    ParamsModel,
    SubPolicyBuilder,
    TraceView,
)

_STATUS_BITS = {"UNSET": STATUS_UNSET, "OK": STATUS_OK, "ERROR": STATUS_ERROR}


class StatusCodeParams(ParamsModel):
    status_codes: list[Literal["OK", "ERROR", "UNSET"]] = Field(min_length=1)


class StatusCode:
    """Samples a trace when any of its spans has one of the configured status codes."""

    type_name: ClassVar[str] = "status_code"
    Params: ClassVar[type[ParamsModel]] = StatusCodeParams

    def __init__(self, name: str, params: StatusCodeParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self._mask = 0
        for code in params.status_codes:
            self._mask |= _STATUS_BITS[code]

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        if trace.status_codes & self._mask:
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED
