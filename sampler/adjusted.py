"""Adjusted counts of kept spans: the keep probability p written as the W3C tracestate `ot=th:` threshold
(OpenTelemetry consistent probability sampling) and as the `tailgate.sample_rate` attribute (1/p).

Written at the wire level: a span's bytes get a trace_state field and an attribute appended (protobuf
takes the last occurrence of a singular field), so a kept span is never re-encoded as a whole.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from sampler.otlp_wire import frame, iter_fields, span_prefix

# 2^56: thresholds and randomness values are 56-bit (OTel "MaxAdjustedCount").
MAX_ADJUSTED_COUNT = 1 << 56
THRESHOLD_DIGITS = 14
SAMPLE_RATE_KEY = "tailgate.sample_rate"

_TAG_TRACE_STATE = 0x1A  # Span.trace_state = 3
_TAG_ATTRIBUTES = 0x4A  # Span.attributes = 9
_TAG_KEY = 0x0A  # KeyValue.key = 1
_TAG_VALUE = 0x12  # KeyValue.value = 2
_TAG_DOUBLE = b"\x21"  # AnyValue.double_value = 4, fixed64
_SAMPLE_RATE_ENTRY = frame(_TAG_KEY, SAMPLE_RATE_KEY.encode())
# A W3C tracestate holds at most this many list members.
_MAX_MEMBERS = 32
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# Suffixes per (tracestate, tail probability), cached; the cache starts over when it reaches this size.
_MAX_SUFFIXES = 10_000


def probability_to_threshold(probability: float) -> int:
    """The 56-bit rejection threshold of a keep probability: 2^56 − round(p × 2^56).

    Rounded half away from zero as the OTel Collector's pkg/sampling; p is clamped to [2^-56, 1].
    """
    scaled = math.floor(probability * MAX_ADJUSTED_COUNT + 0.5)
    return MAX_ADJUSTED_COUNT - min(max(scaled, 1), MAX_ADJUSTED_COUNT)


def threshold_to_probability(threshold: int) -> float:
    return (MAX_ADJUSTED_COUNT - threshold) / MAX_ADJUSTED_COUNT


def encode_threshold(threshold: int) -> str:
    """The `th` value: 14 hex digits with trailing zeros dropped; `0` for keep-everything."""
    if threshold == 0:
        return "0"
    return f"{threshold:0{THRESHOLD_DIGITS}x}".rstrip("0")


def encode(probability: float) -> str:
    """The `th` value for a keep probability."""
    return encode_threshold(probability_to_threshold(probability))


def parse_threshold(value: str) -> int | None:
    """The threshold of a `th` value (1–14 hex digits, implicitly padded with trailing zeros); None when
    it is not valid."""
    if not 1 <= len(value) <= THRESHOLD_DIGITS or not _HEX_DIGITS.issuperset(value):
        return None
    return int(value.ljust(THRESHOLD_DIGITS, "0"), 16)


def _members(tracestate: str) -> list[str]:
    """The list members of a W3C tracestate, without the optional whitespace and empty members."""
    return [member for member in (raw.strip(" \t") for raw in tracestate.split(",")) if member]


def _ot_value(members: list[str]) -> str | None:
    for member in members:
        key, _, value = member.partition("=")
        if key == "ot":
            return value
    return None


def head_probability(tracestate: str) -> float:
    """The keep probability a tracestate's `ot=th:` threshold records; 1.0 without a valid one."""
    if "ot=" not in tracestate:
        return 1.0
    value = _ot_value(_members(tracestate))
    if value is None:
        return 1.0
    for field in value.split(";"):
        key, _, sub = field.partition(":")
        if key == "th":
            threshold = parse_threshold(sub)
            return 1.0 if threshold is None else threshold_to_probability(threshold)
    return 1.0


def with_threshold(tracestate: str, threshold: str) -> str:
    """`tracestate` with the `ot` member's `th` sub-key set to `threshold`.

    The other `ot` sub-keys (rv, ...) and the other vendors' members are kept in order; the modified
    `ot` member moves to the front and the list keeps at most 32 members, as W3C Trace Context says.
    """
    members = _members(tracestate)
    ot_value = _ot_value(members) or ""
    others = [member for member in members if member.partition("=")[0] != "ot"]
    fields = [field for field in ot_value.split(";") if field and field.partition(":")[0] != "th"]
    ot = "ot=" + ";".join([f"th:{threshold}", *fields])
    return ",".join([ot, *others][:_MAX_MEMBERS])


def _sample_rate_attribute(rate: float) -> bytes:
    """A KeyValue `tailgate.sample_rate` = rate (double), framed as a Span.attributes entry."""
    value = frame(_TAG_VALUE, _TAG_DOUBLE + struct.pack("<d", rate))
    return frame(_TAG_ATTRIBUTES, _SAMPLE_RATE_ENTRY + value)


class _Found(NamedTuple):
    """What to write on a span: its new tracestate, its sample rate, and the bytes that append both."""

    trace_state: str
    rate: float
    suffix: bytes


class AdjustedCounts:
    """Writes each kept span's adjusted count, given its trace's tail keep probability.

    A span's probability is p = p_head × p_tail: p_head from the `ot=th:` threshold the span arrived with
    (1 without one), p_tail from the policy that kept the trace. What is appended depends only on the
    span's tracestate and p_tail, so it is computed once per distinct pair and cached.
    """

    def __init__(self) -> None:
        self._suffixes: dict[tuple[str, float], _Found] = {}

    def rewrite_run(self, entries: bytes, spans: Sequence[Span], tail_probability: float) -> bytes:
        """Framed spans (`ScopeSpans.spans` entries) with each span's adjusted count written, re-framed.

        `spans` are the same spans parsed, in order.
        """
        parts: list[bytes | memoryview] = []
        view = memoryview(entries)
        # Spans of a trace nearly always share one tracestate: looked up once per distinct one.
        found_by_state: dict[str, _Found] = {}
        # A span with a sample rate already is rare: the whole run is searched once.
        rated = _SAMPLE_RATE_ENTRY in entries
        for (_, start, end), span in zip(iter_fields(entries), spans, strict=True):
            state = span.trace_state
            found = found_by_state.get(state)
            if found is None:
                found = found_by_state[state] = self._found(state, tail_probability)
            if rated and entries.find(_SAMPLE_RATE_ENTRY, start, end) >= 0:
                payload = _replaced(span, found)
                parts += (span_prefix(len(payload)), payload)
            else:
                suffix = found.suffix
                parts += (span_prefix(end - start + len(suffix)), view[start:end], suffix)
        return b"".join(parts)

    def rewrite_span(self, payload: bytes, span: Span, tail_probability: float) -> bytes:
        """One span's bytes (unframed) with its adjusted count written, framed as a `ScopeSpans.spans`
        entry."""
        return self.rewrite_run(span_prefix(len(payload)) + payload, (span,), tail_probability)

    def _found(self, tracestate: str, tail_probability: float) -> _Found:
        """What to write on spans with this tracestate, cached per (tracestate, tail probability)."""
        key = (tracestate, tail_probability)
        found = self._suffixes.get(key)
        if found is None:
            probability = head_probability(tracestate) * tail_probability
            new_state = with_threshold(tracestate, encode(probability))
            rate = 1 / max(probability, 1 / MAX_ADJUSTED_COUNT)
            suffix = frame(_TAG_TRACE_STATE, new_state.encode()) + _sample_rate_attribute(rate)
            if len(self._suffixes) >= _MAX_SUFFIXES:
                self._suffixes.clear()
            found = self._suffixes[key] = _Found(new_state, rate, suffix)
        return found


def _replaced(span: Span, found: _Found) -> bytes:
    """A span that has a `tailgate.sample_rate` already (from an earlier tier), re-encoded with the new
    one in its place; rare, so the slow way."""
    copy = Span()
    copy.CopyFrom(span)
    attributes = [kv for kv in copy.attributes if kv.key != SAMPLE_RATE_KEY]
    del copy.attributes[:]
    copy.attributes.extend(attributes)
    copy.attributes.add(key=SAMPLE_RATE_KEY).value.double_value = found.rate
    copy.trace_state = found.trace_state
    return copy.SerializeToString()
