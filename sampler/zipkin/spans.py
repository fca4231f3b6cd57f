"""Zipkin v2 request bodies (a JSON list or a proto3 ListOfSpans) read into checked span records.

As Zipkin's own server does, a body with one malformed span is refused as a whole: the DecodeError names
the span's index and the field.
"""

from __future__ import annotations

import binascii
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message

from sampler.errors import DecodeError
from sampler.json_body import load_json
from sampler.zipkin import KINDS

# Above this many microseconds a time no longer fits OTLP's fixed64 nanoseconds.
_MAX_MICROS = ((1 << 64) - 1) // 1000
_MAX_PORT = 65535
_SHOWN_CHARS = 40


@dataclass(slots=True)
class Endpoint:
    """A Zipkin endpoint; empty strings and port 0 stand for absent fields."""

    service_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    port: int = 0


@dataclass(slots=True)
class ZipkinSpan:
    """One checked Zipkin v2 span, ids as bytes and times in nanoseconds."""

    trace_id: bytes  # 16 bytes: a 64-bit id is left-padded with zeros
    span_id: bytes  # 8 bytes
    parent_id: bytes  # 8 bytes, empty for a root
    kind: str  # one of KINDS, empty when absent
    name: str
    start_ns: int | None  # None when the span has no timestamp
    duration_ns: int
    local: Endpoint | None
    remote: Endpoint | None
    annotations: list[tuple[int, str]]  # (time in nanoseconds, value)
    tags: dict[str, str]


def parse_json(body: bytes) -> list[ZipkinSpan]:
    """Read a Zipkin JSON v2 body: a list of span objects."""
    document = load_json(body)
    if not isinstance(document, list):
        raise DecodeError(f"the body must be a JSON array of Zipkin v2 spans, got {_json_type(document)}")
    return [_span_from_json(index, item) for index, item in enumerate(document)]


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


_JSON_TYPES = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    list: "array",
    dict: "object",
    type(None): "null",
}


def _invalid(index: int, field: str, problem: str) -> DecodeError:
    return DecodeError(f"span {index}: {field}: {problem}")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def _get(container: dict[str, Any], key: str, expected: str, index: int, within: str = "") -> Any:
    """`container[key]` if it has the JSON type `expected`; None when absent or null."""
    value = container.get(key)
    if value is None or _json_type(value) == expected:
        return value
    field = f"{within}.{key}" if within else key
    article = "an" if expected[0] in "aeiou" else "a"
    raise _invalid(index, field, f"must be {article} {expected}, got {_json_type(value)}")


def _span_from_json(index: int, item: Any) -> ZipkinSpan:
    if not isinstance(item, dict):
        raise DecodeError(f"span {index}: must be an object, got {_json_type(item)}")
    kind = _get(item, "kind", "string", index) or ""
    if kind and kind not in KINDS:
        raise _invalid(index, "kind", f"must be one of {', '.join(KINDS)}, got {_shown(kind)}")
    for flag in ("debug", "shared"):
        _get(item, flag, "boolean", index)
    return ZipkinSpan(
        trace_id=_trace_id(index, "traceId", _hex(index, "traceId", item.get("traceId"), (16, 32))),
        span_id=_span_id(index, "id", _hex(index, "id", item.get("id"), (16,))),
        parent_id=_parent_id(index, "parentId", item.get("parentId")),
        kind=kind,
        name=_get(item, "name", "string", index) or "",
        # zipkin-go (the Collector's model) reads 0 and absent alike.
        start_ns=_nanos(index, "timestamp", item.get("timestamp")) or None,
        duration_ns=_nanos(index, "duration", item.get("duration")) or 0,
        local=_json_endpoint(index, item, "localEndpoint"),
        remote=_json_endpoint(index, item, "remoteEndpoint"),
        annotations=_json_annotations(index, _get(item, "annotations", "array", index) or []),
        tags=_json_tags(index, _get(item, "tags", "object", index) or {}),
    )


def _hex(index: int, field: str, value: Any, lengths: tuple[int, ...]) -> bytes:
    if value is None:
        raise _invalid(index, field, "is required")
    if not isinstance(value, str):
        raise _invalid(index, field, f"must be a string, got {_json_type(value)}")
    expected = " or ".join(map(str, lengths))
    if len(value) not in lengths:
        raise _invalid(index, field, f"must be {expected} hex characters, got {_shown(value)}")
    try:
        return binascii.unhexlify(value)
    except (binascii.Error, ValueError):
        raise _invalid(index, field, f"must be {expected} hex characters, got {_shown(value)}") from None


def _trace_id(index: int, field: str, raw: bytes) -> bytes:
    if len(raw) not in (8, 16):
        raise _invalid(index, field, f"must be 8 or 16 bytes, got {len(raw)}")
    if not any(raw):
        raise _invalid(index, field, "must not be all zeros")
    return raw.rjust(16, b"\x00")


def _span_id(index: int, field: str, raw: bytes) -> bytes:
    if len(raw) != 8:
        raise _invalid(index, field, f"must be 8 bytes, got {len(raw)}")
    if not any(raw):
        raise _invalid(index, field, "must not be all zeros")
    return raw


def _parent_id(index: int, field: str, value: Any) -> bytes:
    # An all-zero parent id marks a root, as in Zipkin.
    if value is None:
        return b""
    raw = _hex(index, field, value, (16,))
    return raw if any(raw) else b""


def _nanos(index: int, field: str, micros: Any) -> int | None:
    if micros is None:
        return None
    # NaN fails the comparison too.
    if _json_type(micros) != "number" or not 0 <= micros <= _MAX_MICROS:
        raise _invalid(index, field, f"must be a number of microseconds (0 or more), got {_shown(micros)}")
    return micros * 1000 if isinstance(micros, int) else round(micros * 1000)


def _json_endpoint(index: int, item: dict[str, Any], key: str) -> Endpoint | None:
    endpoint = _get(item, key, "object", index)
    if endpoint is None:
        return None
    port = _get(endpoint, "port", "number", index, key) or 0
    if not isinstance(port, int) or not 0 <= port <= _MAX_PORT:
        raise _invalid(index, f"{key}.port", f"must be a port number (0 to {_MAX_PORT}), got {_shown(port)}")
    return Endpoint(
        _get(endpoint, "serviceName", "string", index, key) or "",
        _get(endpoint, "ipv4", "string", index, key) or "",
        _get(endpoint, "ipv6", "string", index, key) or "",
        port,
    )


def _json_annotations(index: int, annotations: list[Any]) -> list[tuple[int, str]]:
    read: list[tuple[int, str]] = []
    for position, annotation in enumerate(annotations):
        field = f"annotations[{position}]"
        if not isinstance(annotation, dict):
            raise _invalid(index, field, f"must be an object, got {_json_type(annotation)}")
        nanos = _nanos(index, f"{field}.timestamp", annotation.get("timestamp"))
        value = _get(annotation, "value", "string", index, field)
        if nanos is None or value is None:
            raise _invalid(index, field, "needs a timestamp and a value")
        read.append((nanos, value))
    return read


def _json_tags(index: int, tags: dict[str, Any]) -> dict[str, str]:
    """The tags, checked; a null value counts as absent."""
    has_null = False
    for key, value in tags.items():
        if value is None:
            has_null = True
        elif not isinstance(value, str):
            raise _invalid(index, f"tags.{key}", f"must be a string, got {_json_type(value)}")
    return {key: value for key, value in tags.items() if value is not None} if has_null else tags


def _list_of_spans_class() -> type[Message]:
    """The ListOfSpans message of openzipkin's zipkin.proto (proto3), declared here."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="tailgate/zipkin.proto", package="tailgate.zipkin", syntax="proto3"
    )
    endpoint = file.message_type.add(name="Endpoint")
    endpoint.field.add(name="service_name", number=1, type=field.TYPE_STRING)
    endpoint.field.add(name="ipv4", number=2, type=field.TYPE_BYTES)
    endpoint.field.add(name="ipv6", number=3, type=field.TYPE_BYTES)
    endpoint.field.add(name="port", number=4, type=field.TYPE_INT32)
    annotation = file.message_type.add(name="Annotation")
    annotation.field.add(name="timestamp", number=1, type=field.TYPE_FIXED64)
    annotation.field.add(name="value", number=2, type=field.TYPE_STRING)
    span = file.message_type.add(name="Span")
    tags_entry = span.nested_type.add(name="TagsEntry")
    tags_entry.options.map_entry = True
    tags_entry.field.add(name="key", number=1, type=field.TYPE_STRING)
    tags_entry.field.add(name="value", number=2, type=field.TYPE_STRING)
    for number, name, field_type, type_name in (
        (1, "trace_id", field.TYPE_BYTES, ""),
        (2, "parent_id", field.TYPE_BYTES, ""),
        (3, "id", field.TYPE_BYTES, ""),
        (4, "kind", field.TYPE_INT32, ""),  # the Kind enum, read as its number
        (5, "name", field.TYPE_STRING, ""),
        (6, "timestamp", field.TYPE_FIXED64, ""),
        (7, "duration", field.TYPE_UINT64, ""),
        (8, "local_endpoint", field.TYPE_MESSAGE, ".tailgate.zipkin.Endpoint"),
        (9, "remote_endpoint", field.TYPE_MESSAGE, ".tailgate.zipkin.Endpoint"),
        (10, "annotations", field.TYPE_MESSAGE, ".tailgate.zipkin.Annotation"),
        (11, "tags", field.TYPE_MESSAGE, ".tailgate.zipkin.Span.TagsEntry"),
    ):
        label = field.LABEL_REPEATED if name in ("annotations", "tags") else field.LABEL_OPTIONAL
        entry = span.field.add(name=name, number=number, type=field_type, label=label)
        if type_name:
            entry.type_name = type_name
    spans = file.message_type.add(name="ListOfSpans")
    spans.field.add(
        name="spans",
        number=1,
        type=field.TYPE_MESSAGE,
        type_name=".tailgate.zipkin.Span",
        label=field.LABEL_REPEATED,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tailgate.zipkin.ListOfSpans"))


_ListOfSpans = _list_of_spans_class()
# zipkin.proto's Span.Kind numbers; 0 is SPAN_KIND_UNSPECIFIED.
_PROTO_KINDS = dict(enumerate(KINDS, start=1))


def parse_proto3(body: bytes) -> list[ZipkinSpan]:
    """Read a Zipkin proto3 body: a ListOfSpans message."""
    try:
        message: Any = _ListOfSpans.FromString(body)
    except ProtobufDecodeError as error:
        raise DecodeError(f"malformed protobuf ListOfSpans: {error}") from None
    return [_span_from_proto(index, span) for index, span in enumerate(message.spans)]


def _span_from_proto(index: int, span: Any) -> ZipkinSpan:
    return ZipkinSpan(
        trace_id=_trace_id(index, "trace_id", span.trace_id),
        span_id=_span_id(index, "id", span.id),
        parent_id=_proto_parent_id(index, span.parent_id),
        kind=_PROTO_KINDS.get(span.kind, ""),
        name=span.name,
        start_ns=_proto_nanos(index, "timestamp", span.timestamp) if span.timestamp else None,
        duration_ns=_proto_nanos(index, "duration", span.duration),
        local=_proto_endpoint(index, span, "local_endpoint"),
        remote=_proto_endpoint(index, span, "remote_endpoint"),
        annotations=[
            (_proto_nanos(index, "annotations.timestamp", item.timestamp), item.value)
            for item in span.annotations
        ],
        tags=dict(span.tags),
    )


def _proto_nanos(index: int, field: str, micros: int) -> int:
    if micros > _MAX_MICROS:
        raise _invalid(index, field, f"out of range: {micros}")
    return micros * 1000


def _proto_parent_id(index: int, raw: bytes) -> bytes:
    if not raw or not any(raw):
        return b""
    return _span_id(index, "parent_id", raw)


def _proto_endpoint(index: int, span: Any, key: str) -> Endpoint | None:
    if not span.HasField(key):
        return None
    endpoint = getattr(span, key)
    try:
        ipv4 = str(ipaddress.IPv4Address(endpoint.ipv4)) if endpoint.ipv4 else ""
        ipv6 = str(ipaddress.IPv6Address(endpoint.ipv6)) if endpoint.ipv6 else ""
    except ipaddress.AddressValueError as error:
        raise _invalid(index, key, str(error)) from None
    if not 0 <= endpoint.port <= _MAX_PORT:
        raise _invalid(index, f"{key}.port", f"must be a port number (0 to {_MAX_PORT}), got {endpoint.port}")
    return Endpoint(endpoint.service_name, ipv4, ipv6, endpoint.port)
