"""The OTLP protobuf wire format as tailgate stores and forwards it.

Spans stay in their serialized form from ingest to export: the receiver takes each span's bytes as they
arrived, the buffer keeps them framed as `ScopeSpans.spans` entries, and exporters concatenate them into
an ExportTraceServiceRequest without re-encoding a message.
"""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

# Field tags (field number << 3 | wire type 2) of the messages on the path request → span.
TAG_RESOURCE_SPANS = 0x0A  # ExportTraceServiceRequest.resource_spans = 1
TAG_RESOURCE = 0x0A  # ResourceSpans.resource = 1
TAG_SCOPE_SPANS = 0x12  # ResourceSpans.scope_spans = 2
TAG_SCHEMA_URL = 0x1A  # ResourceSpans.schema_url = 3, ScopeSpans.schema_url = 3
TAG_SCOPE = 0x0A  # ScopeSpans.scope = 1
TAG_SPANS = 0x12  # ScopeSpans.spans = 2

_VARINT_CACHE = [bytes([n]) for n in range(128)]


def encode_varint(value: int) -> bytes:
    """Encode a non-negative int as a protobuf base-128 varint."""
    if value < 128:
        return _VARINT_CACHE[value]
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame(tag: int, payload: bytes) -> bytes:
    """Encode one length-delimited field: tag, length, payload."""
    return bytes((tag,)) + encode_varint(len(payload)) + payload


@dataclass(frozen=True, slots=True, eq=False)
class Scope:
    """The resource and instrumentation scope a group of spans shares, in wire form.

    `resource` holds the ResourceSpans fields other than scope_spans (resource, schema_url), `scope` the
    ScopeSpans fields other than spans (scope, schema_url). Interned by the receiver so that all traces
    from one service share one object.
    """

    resource: bytes
    scope: bytes


# A run of spans that share a Scope: (scope, concatenated `ScopeSpans.spans` entries, span count).
SpanGroup = tuple[Scope, bytes, int]


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    pos += 1
    value = byte & 0x7F
    shift = 7
    while byte & 0x80:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
    return value, pos


def iter_fields(buf: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """The length-delimited fields of a message as (tag, payload start, payload end).

    Scalar fields are skipped. Raises ValueError on a truncated message or a group (wire types 3, 4),
    which OTLP never uses.
    """
    if end is None:
        end = len(buf)
    try:
        return _iter_fields(buf, start, end)
    except IndexError:
        raise ValueError("truncated message") from None


def _iter_fields(buf: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    fields: list[tuple[int, int, int]] = []
    pos = start
    while pos < end:
        tag, pos = _read_varint(buf, pos)
        wire_type = tag & 7
        if wire_type == 2:
            length, pos = _read_varint(buf, pos)
            fields.append((tag, pos, pos + length))
            pos += length
        elif wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
    if pos != end:
        raise ValueError("truncated message")
    return fields


def encode_request(groups: list[SpanGroup]) -> bytes:
    """Build an ExportTraceServiceRequest from span groups, merging groups of the same Scope."""
    by_resource: dict[bytes, dict[bytes, list[bytes]]] = {}
    for scope, entries, _ in groups:
        scopes = by_resource.get(scope.resource)
        if scopes is None:
            scopes = by_resource[scope.resource] = {}
        runs = scopes.get(scope.scope)
        if runs is None:
            scopes[scope.scope] = [entries]
        else:
            runs.append(entries)
    # Lengths first, then a single join: the span bytes are copied once, not once per nesting level.
    parts: list[bytes] = []
    for resource, scopes in by_resource.items():
        scope_parts: list[bytes] = []
        resource_length = len(resource)
        for scope_fields, runs in scopes.items():
            scope_length = len(scope_fields) + sum(map(len, runs))
            header = bytes((TAG_SCOPE_SPANS,)) + encode_varint(scope_length)
            scope_parts += (header, scope_fields, *runs)
            resource_length += len(header) + scope_length
        parts += (bytes((TAG_RESOURCE_SPANS,)) + encode_varint(resource_length), resource, *scope_parts)
    return b"".join(parts)


def scope_with_attribute(scope: Scope, key: str, value: str) -> Scope:
    """`scope` with a string attribute set on its InstrumentationScope, replacing any of that key."""
    instrumentation = InstrumentationScope()
    others: list[bytes] = []
    for tag, start, end in iter_fields(scope.scope):
        if tag == TAG_SCOPE:
            instrumentation.MergeFromString(scope.scope[start:end])
        else:
            others.append(frame(tag, scope.scope[start:end]))
    attributes = [kv for kv in instrumentation.attributes if kv.key != key]
    del instrumentation.attributes[:]
    instrumentation.attributes.extend(attributes)
    instrumentation.attributes.add(key=key).value.string_value = value
    return Scope(scope.resource, frame(TAG_SCOPE, instrumentation.SerializeToString()) + b"".join(others))


# Tag and length prefixes of spans up to 16 KiB (two-byte lengths), built once.
_SPAN_PREFIXES = [bytes((TAG_SPANS,)) + encode_varint(length) for length in range(1 << 14)]


def span_prefix(length: int) -> bytes:
    """The `ScopeSpans.spans` tag and length for a span of `length` bytes."""
    if length < len(_SPAN_PREFIXES):
        return _SPAN_PREFIXES[length]
    return bytes((TAG_SPANS,)) + encode_varint(length)


def frame_run(payloads: list[bytes]) -> bytes:
    """Serialized spans as concatenated `ScopeSpans.spans` entries."""
    prefixes = _SPAN_PREFIXES
    try:
        if len(payloads) == 1:
            return prefixes[len(payloads[0])] + payloads[0]
        return b"".join([part for payload in payloads for part in (prefixes[len(payload)], payload)])
    except IndexError:  # a span over 16 KiB
        return b"".join([span_prefix(len(payload)) + payload for payload in payloads])


def split_framed(entries: bytes) -> list[bytes]:
    """The framed spans of concatenated `ScopeSpans.spans` entries, each with its tag and length. Bytes
    that do not frame a whole entry (a malformed run) come last, as one entry that does not parse."""
    return [entries[pos:end] for pos, _, end in _entries(entries)]


def split_payloads(entries: bytes) -> list[bytes]:
    """The spans of concatenated `ScopeSpans.spans` entries, without their tags and lengths (what is
    left of a malformed run comes last, as is)."""
    return [entries[start:end] for _, start, end in _entries(entries)]


def _entries(entries: bytes) -> list[tuple[int, int, int]]:
    """(entry start, payload start, end) of each entry."""
    found = []
    pos = 0
    end = len(entries)
    while pos < end:
        try:
            length, start = _read_varint(entries, pos + 1)
        except IndexError:
            found.append((pos, pos, end))
            break
        if start + length > end:
            found.append((pos, pos, end))
            break
        found.append((pos, start, start + length))
        pos = start + length
    return found
