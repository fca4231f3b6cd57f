"""The `bytes_limiting` policy: keeps traces while a token bucket of bytes has room for them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView
from policies.rate_limiting import TokenBucketPolicy


class BytesLimitingParams(ParamsModel):
    bytes_per_second: int = Field(gt=0)
    # 0 means unset, as in the OTel Collector: twice bytes_per_second.
    burst_capacity: int = Field(default=0, ge=0)


class BytesLimiting(TokenBucketPolicy):
    """Keeps traces while a token bucket of bytes, refilled at `bytes_per_second`, holds their size.

    A trace's size is the serialized size of its spans as received (`TraceView.nbytes`).
    """

    type_name: ClassVar[str] = "bytes_limiting"
    Params: ClassVar[type[ParamsModel]] = BytesLimitingParams

    def __init__(self, name: str, params: BytesLimitingParams, build_sub: SubPolicyBuilder) -> None:
        super().__init__(name, params.bytes_per_second, params.burst_capacity)

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        return self.admit(trace.nbytes, now)
