"""The `string_attribute` policy: keeps (or, inverted, drops) traces by a string attribute."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, ValidationInfo

from policies import re2
from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView

# The Collector's regex result cache size when cache_max_size is 0 or absent.
DEFAULT_CACHE_SIZE = 128


def _compilable(pattern: str, info: ValidationInfo) -> str:
    """With regex matching on, each value must compile (the Collector would panic at startup)."""
    if info.data.get("enabled_regex_matching"):
        try:
            re.compile(re2.translate(pattern))
        except (re.error, ValueError) as error:
            raise ValueError(f"not a valid regular expression: {error}") from None
    return pattern


class StringAttributeParams(ParamsModel):
    key: str = Field(min_length=1)
    # Declared before `values` so the regex check of each value can see it.
    enabled_regex_matching: bool = False
    values: list[Annotated[str, AfterValidator(_compilable)]] = Field(min_length=1)
    cache_max_size: int = Field(default=0, ge=0)
    invert_match: bool = False


class StringAttribute:
    """Matches resource and span attributes `key` with a string value.

    Exact matching compares whole strings; with `enabled_regex_matching` a value matches when any
    pattern matches anywhere in it (unanchored, as Go's regexp.MatchString in the Collector; anchor
    with ^...$ for whole values). Patterns are RE2, read by Python's `re` (see policies/re2.py).
    Empty strings never match, as for the Collector's exact matching and span attributes.
    """

    type_name: ClassVar[str] = "string_attribute"
    Params: ClassVar[type[ParamsModel]] = StringAttributeParams

    def __init__(self, name: str, params: StringAttributeParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.key = params.key
        self.attribute_keys = frozenset({params.key})
        self.invert_match = params.invert_match
        self._matches: Callable[[str], bool]
        if params.enabled_regex_matching:
            patterns = tuple(re.compile(re2.translate(pattern)) for pattern in params.values)

            def search(value: str) -> bool:
                return any(pattern.search(value) for pattern in patterns)

            # Attribute values repeat a lot (routes, service names); caching as the Collector does
            # saves the regex scan for the common ones.
            cache_size = params.cache_max_size or DEFAULT_CACHE_SIZE
            self._matches = functools.lru_cache(maxsize=cache_size)(search)
        else:
            self._matches = frozenset(params.values).__contains__

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        matches = self._matches
        matched = any(
            isinstance(value, str) and value and matches(value) for value in trace.attribute_values(self.key)
        )
        if self.invert_match:
            return Decision.INVERT_NOT_SAMPLED if matched else Decision.INVERT_SAMPLED
        return Decision.SAMPLED if matched else Decision.NOT_SAMPLED
