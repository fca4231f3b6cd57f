"""The `numeric_attribute` policy: keeps (or, inverted, drops) traces by a numeric attribute."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class NumericAttributeParams(ParamsModel):
    key: str = Field(min_length=1)
    # Either bound may be left open, but not both (as in the OTel Collector).
    min_value: int | None = None
    max_value: int | None = None
    invert_match: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> NumericAttributeParams:
        if self.min_value is None and self.max_value is None:
            raise ValueError("at least one of min_value or max_value must be set")
        low, high = self.min_value, self.max_value
        if low is not None and high is not None and low > high:
            raise ValueError(f"min_value ({low}) must not exceed max_value ({high})")
        return self


class NumericAttribute:
    """Matches resource and span attributes `key` with min_value <= value <= max_value (inclusive).

    Integer and double values are compared; booleans and strings never match. The Collector reads
    every value with Value.Int(), which yields 0 for doubles and strings, so a range holding 0 would
    match those there; tailgate compares doubles by their value instead.
    """

    type_name: ClassVar[str] = "numeric_attribute"
    Params: ClassVar[type[ParamsModel]] = NumericAttributeParams

    def __init__(self, name: str, params: NumericAttributeParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.key = params.key
        self.attribute_keys = frozenset({params.key})
        self.invert_match = params.invert_match
        self.min_value: float = params.min_value if params.min_value is not None else float("-inf")
        self.max_value: float = params.max_value if params.max_value is not None else float("inf")

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        low, high = self.min_value, self.max_value
        matched = any(
            (type(value) is int or type(value) is float) and low <= value <= high
            for value in trace.attribute_values(self.key)
        )
        if self.invert_match:
            return Decision.INVERT_NOT_SAMPLED if matched else Decision.INVERT_SAMPLED
        return Decision.SAMPLED if matched else Decision.NOT_SAMPLED
