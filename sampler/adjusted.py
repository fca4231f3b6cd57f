"""Adjusted counts of kept spans: the keep probability p written as the W3C tracestate `ot=th:` threshold
(OpenTelemetry consistent probability sampling) and as the `tailgate.sample_rate` attribute (1/p).

Written at the wire level: a span's bytes get a trace_state field and an attribute appended (protobuf
takes the last occurrence of a singular field), so a kept span is never re-encoded as a whole. Also the
attribute limits of kept spans, which re-encode only the spans over them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import NamedTuple

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client import Counter

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


class AttributeLimits:
    """Cuts kept spans to attribute limits, as the OTel SDK's span limits: the first `max_attributes` of
    a span's (an event's, a link's) attributes stay and its `dropped_attributes_count` counts the rest;
    string values longer than `max_value_length` characters, bytes values longer than that many bytes,
    are cut to it (also inside arrays and key-value lists). 0 = no limit.

    A span within the limits is left as it arrived; one over them is re-encoded. `dropped` and
    `shortened` count the attributes left out and the values cut.
    """

    def __init__(
        self, max_attributes: int, max_value_length: int, dropped: Counter, shortened: Counter
    ) -> None:
        self.max_attributes = max_attributes
        self.max_value_length = max_value_length
        self._dropped = dropped
        self._shortened = shortened

    def limit_run(self, entries: bytes, spans: Sequence[Span]) -> tuple[bytes, Sequence[Span]]:
        """Framed spans (`ScopeSpans.spans` entries) and the same spans parsed, with the spans over the
        limits cut; the input itself when no span is over them."""
        over = [index for index, span in enumerate(spans) if self._exceeds(span)]
        if not over:
            return entries, spans
        limited = list(spans)
        # The entries are spans only, back to back: an entry starts where the one before it ends.
        ends = [0, *(end for _, _, end in iter_fields(entries))]
        parts: list[bytes | memoryview] = []
        view = memoryview(entries)
        done = 0
        for index in over:
            limited[index] = span = self._limited(spans[index])
            payload = span.SerializeToString()
            parts += (view[done : ends[index]], span_prefix(len(payload)), payload)
            done = ends[index + 1]
        parts.append(view[done:])
        return b"".join(parts), limited

    def limit_span(self, payload: bytes, span: Span) -> tuple[bytes, Span]:
        """One span's bytes (unframed) and the span parsed, cut to the limits when over them."""
        if not self._exceeds(span):
            return payload, span
        limited = self._limited(span)
        return limited.SerializeToString(), limited

    def _exceeds(self, span: Span) -> bool:
        """Whether a span is over the limits: counts first, values only when the span is long enough to
        hold one that is too long."""
        count = self.max_attributes
        if count and (
            len(span.attributes) > count
            or any(len(event.attributes) > count for event in span.events)
            or any(len(link.attributes) > count for link in span.links)
        ):
            return True
        length = self.max_value_length
        # A value of more than `length` characters takes more than `length` bytes.
        if length and span.ByteSize() > length:
            return any(_too_long(kv.value, length) for kv in _all_attributes(span))
        return False

    def _limited(self, span: Span) -> Span:
        """A copy of a span over the limits, cut to them, counted."""
        copy = Span()
        copy.CopyFrom(span)
        dropped, shortened = self._limit(copy.attributes)
        copy.dropped_attributes_count += dropped
        parts: list[Span.Event | Span.Link] = [*copy.events, *copy.links]
        for part in parts:
            part_dropped, part_shortened = self._limit(part.attributes)
            part.dropped_attributes_count += part_dropped
            dropped += part_dropped
            shortened += part_shortened
        if dropped:
            self._dropped.inc(dropped)
        if shortened:
            self._shortened.inc(shortened)
        return copy

    def _limit(self, attributes: RepeatedCompositeFieldContainer[KeyValue]) -> tuple[int, int]:
        """Cut one attribute list in place; returns how many attributes were left out, how many values
        were cut."""
        dropped = 0
        count = self.max_attributes
        if count and len(attributes) > count:
            dropped = len(attributes) - count
            del attributes[count:]
        shortened = 0
        if self.max_value_length:
            shortened = sum(_shorten(kv.value, self.max_value_length) for kv in attributes)
        return dropped, shortened


def _all_attributes(span: Span) -> list[KeyValue]:
    """A span's attributes and those of its events and links."""
    attributes = list(span.attributes)
    parts: list[Span.Event | Span.Link] = [*span.events, *span.links]
    for part in parts:
        attributes.extend(part.attributes)
    return attributes


def _too_long(value: AnyValue, length: int) -> bool:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return len(value.string_value) > length
    if kind == "bytes_value":
        return len(value.bytes_value) > length
    if kind == "array_value":
        return any(_too_long(item, length) for item in value.array_value.values)
    if kind == "kvlist_value":
        return any(_too_long(kv.value, length) for kv in value.kvlist_value.values)
    return False


def _shorten(value: AnyValue, length: int) -> int:
    """Cut a value in place to `length` characters (a string, on a character boundary) or bytes (bytes),
    also inside arrays and key-value lists; returns how many values were cut."""
    kind = value.WhichOneof("value")
    if kind == "string_value" and len(value.string_value) > length:
        value.string_value = value.string_value[:length]
        return 1
    if kind == "bytes_value" and len(value.bytes_value) > length:
        value.bytes_value = value.bytes_value[:length]
        return 1
    if kind == "array_value":
        return sum(_shorten(item, length) for item in value.array_value.values)
    if kind == "kvlist_value":
        return sum(_shorten(kv.value, length) for kv in value.kvlist_value.values)
    return 0
