"""The `trace_state` policy: keeps traces with a span whose W3C tracestate holds one of some values."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, ClassVar

from pydantic import AfterValidator, Field, ValidationInfo

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView

# W3C Trace Context, "tracestate" header: list-member keys and values.
_KEY = re.compile(
    r"[a-z][a-z0-9_\-*/]{0,255}"  # simple-key
    r"|[a-z0-9][a-z0-9_\-*/]{0,240}@[a-z][a-z0-9_\-*/]{0,13}"  # multi-tenant-key
)
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_MAX_MEMBERS = 32
_OWS = " \t"
# The Collector leaves out values for which key=value would reach 256 characters.
_MAX_KEY_VALUE = 255
# Distinct tracestate strings remembered parsed; a service sends the same few over and over.
_PARSED_CACHE_SIZE = 1024

_EMPTY: Mapping[str, str] = MappingProxyType({})


@functools.lru_cache(maxsize=_PARSED_CACHE_SIZE)
def parse_tracestate(header: str) -> Mapping[str, str] | None:
    """The list-members of a W3C tracestate as key -> value, or None when it is not valid.

    As the W3C grammar: members separated by commas with optional spaces or tabs around them,
    empty members skipped; a malformed member, a repeated key or more than 32 members make the
    whole tracestate invalid.
    """
    if not header:
        return _EMPTY
    members: dict[str, str] = {}
    for item in header.split(","):
        member = item.strip(_OWS)
        if not member:
            continue
        key, equals, value = member.partition("=")
        if not equals or key in members or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            return None
        members[key] = value
        if len(members) > _MAX_MEMBERS:
            return None
    return MappingProxyType(members)


def _valid_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError("not a valid W3C tracestate key")
    return key


def _valid_value(value: str, info: ValidationInfo) -> str:
    if not _VALUE.fullmatch(value):
        raise ValueError("not a valid W3C tracestate value")
    key = info.data.get("key")
    if key is not None and len(key) + len(value) > _MAX_KEY_VALUE:
        raise ValueError("key and value together must be shorter than 256 characters")
    return value


class TraceStateParams(ParamsModel):
    key: Annotated[str, AfterValidator(_valid_key)]
    values: list[Annotated[str, AfterValidator(_valid_value)]] = Field(min_length=1)


class TraceState:
    """Samples a trace when any span's tracestate has list-member `key` with one of `values`.

    A span whose tracestate is not valid W3C is passed over, as in the OTel Collector.
    """

    type_name: ClassVar[str] = "trace_state"
    Params: ClassVar[type[ParamsModel]] = TraceStateParams

    def __init__(self, name: str, params: TraceStateParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.key = params.key
        self.values = frozenset(params.values)

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        key, values = self.key, self.values
        for record in trace.spans():
            header = record.span.trace_state
            if not header:
                continue
            members = parse_tracestate(header)
            if members is not None and members.get(key) in values:
                return Decision.SAMPLED
        return Decision.NOT_SAMPLED
