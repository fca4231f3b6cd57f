"""The `boolean_attribute` policy: keeps (or, inverted, drops) traces by a boolean attribute."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, StrictBool

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView


class BooleanAttributeParams(ParamsModel):
    key: str = Field(min_length=1)
    # Strict: YAML `value: "false"` or `value: 0` is an error rather than a silent conversion.
    value: StrictBool
    invert_match: bool = False


class BooleanAttribute:
    """Matches resource and span attributes `key` with a boolean value equal to `value`.

    Only boolean values match. The Collector reads every value with Value.Bool(), which yields
    false for strings and numbers, so there `value: false` also matches such values; tailgate
    does not.
    """

    type_name: ClassVar[str] = "boolean_attribute"
    Params: ClassVar[type[ParamsModel]] = BooleanAttributeParams

    def __init__(self, name: str, params: BooleanAttributeParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.key = params.key
        self.attribute_keys = frozenset({params.key})
        self.value = params.value
        self.invert_match = params.invert_match

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        wanted = self.value
        # Identity with True/False: integers 1 and 0 compare equal to them but are not booleans.
        matched = any(value is wanted for value in trace.attribute_values(self.key))
        if self.invert_match:
            return Decision.INVERT_NOT_SAMPLED if matched else Decision.INVERT_SAMPLED
        return Decision.SAMPLED if matched else Decision.NOT_SAMPLED
