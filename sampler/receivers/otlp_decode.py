"""Decoding OTLP trace requests (protobuf and the OTLP JSON mapping) into span batches for the buffer.

Protobuf bodies are read through two projections of the OTLP schema instead of the full one: one declares
only the span fields the buffer summarizes (ids, times, status), the other declares each span as bytes.
upb skips everything else without building it, which makes decoding about three times cheaper than a
full parse; spans are checked in full later, when (and only if) their trace is kept.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.message import Message
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sampler.buffer import SpanBatch
from sampler.errors import DecodeError
from sampler.json_body import load_json
from sampler.otlp_wire import TAG_RESOURCE, TAG_SCHEMA_URL, TAG_SCOPE, frame

# Byte fields the OTLP JSON mapping writes as hex, where protobuf's JSON mapping expects base64.
_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
# Replaces an id that is not valid hex: decodes to bytes no span id can have, so the span is rejected
# with a partial_success message instead of failing the whole request.
_INVALID_ID = base64.b64encode(b"\x00").decode()


def _projection_classes() -> tuple[type[Message], type[Message]]:
    """Message classes for the two projections of ExportTraceServiceRequest (same field numbers)."""
    field = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(
        name="tailgate/otlp_projection.proto", package="tailgate.projection", syntax="proto3"
    )

    def message(name: str, *fields: tuple[int, str, int, str | None]) -> None:
        proto = file.message_type.add(name=name)
        for number, field_name, field_type, message_type in fields:
            label = field.LABEL_REPEATED if field_name in _REPEATED else field.LABEL_OPTIONAL
            entry = proto.field.add(name=field_name, number=number, type=field_type, label=label)
            if message_type is not None:
                entry.type_name = f".tailgate.projection.{message_type}"

    message("Status", (3, "code", field.TYPE_INT32, None))
    message(
        "Span",
        (1, "trace_id", field.TYPE_BYTES, None),
        (2, "span_id", field.TYPE_BYTES, None),
        (4, "parent_span_id", field.TYPE_BYTES, None),
        (7, "start_time_unix_nano", field.TYPE_FIXED64, None),
        (8, "end_time_unix_nano", field.TYPE_FIXED64, None),
        (15, "status", field.TYPE_MESSAGE, "Status"),
    )
    message(
        "ScopeSpans",
        (1, "scope", field.TYPE_BYTES, None),
        (2, "spans", field.TYPE_MESSAGE, "Span"),
        (3, "schema_url", field.TYPE_STRING, None),
    )
    message(
        "ResourceSpans",
        (1, "resource", field.TYPE_BYTES, None),
        (2, "scope_spans", field.TYPE_MESSAGE, "ScopeSpans"),
        (3, "schema_url", field.TYPE_STRING, None),
    )
    message("Request", (1, "resource_spans", field.TYPE_MESSAGE, "ResourceSpans"))
    message("RawScopeSpans", (2, "spans", field.TYPE_BYTES, None))
    message("RawResourceSpans", (2, "scope_spans", field.TYPE_MESSAGE, "RawScopeSpans"))
    message("RawRequest", (1, "resource_spans", field.TYPE_MESSAGE, "RawResourceSpans"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tailgate.projection.Request")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("tailgate.projection.RawRequest")),
    )


_REPEATED = frozenset({"spans", "scope_spans", "resource_spans"})
_SummaryRequest, _RawRequest = _projection_classes()


def decode_protobuf(body: bytes) -> list[SpanBatch]:
    """Decode a protobuf ExportTraceServiceRequest into span batches."""
    try:
        summary: Any = _SummaryRequest.FromString(body)
        raw: Any = _RawRequest.FromString(body)
    except ProtobufDecodeError as error:
        raise DecodeError(f"malformed protobuf ExportTraceServiceRequest: {error}") from None
    batches: list[SpanBatch] = []
    for resource_spans, raw_resource_spans in zip(summary.resource_spans, raw.resource_spans, strict=True):
        resource = _wire(TAG_RESOURCE, resource_spans.resource, resource_spans.schema_url)
        for scope_spans, raw_scope_spans in zip(
            resource_spans.scope_spans, raw_resource_spans.scope_spans, strict=True
        ):
            batches.append(
                SpanBatch(
                    resource,
                    _wire(TAG_SCOPE, scope_spans.scope, scope_spans.schema_url),
                    resource_spans.resource,
                    scope_spans.spans,
                    raw_scope_spans.spans,
                )
            )
    return batches


def _wire(tag: int, payload: bytes, schema_url: str) -> bytes:
    wire = frame(tag, payload) if payload else b""
    if schema_url:
        wire += frame(TAG_SCHEMA_URL, schema_url.encode())
    return wire


def decode_json(body: bytes) -> list[SpanBatch]:
    """Decode a request in the OTLP JSON mapping (hex ids, lowerCamelCase or snake_case keys)."""
    document = load_json(body)
    if not isinstance(document, dict):
        raise DecodeError("malformed JSON: the body must be an object (ExportTraceServiceRequest)")
    _hex_ids_to_base64(document)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as error:
        raise DecodeError(f"invalid OTLP JSON: {error}") from None
    batches: list[SpanBatch] = []
    for resource_spans in request.resource_spans:
        resource_payload = (
            resource_spans.resource.SerializeToString() if resource_spans.HasField("resource") else b""
        )
        resource = _wire(TAG_RESOURCE, resource_payload, resource_spans.schema_url)
        for scope_spans in resource_spans.scope_spans:
            scope_payload = scope_spans.scope.SerializeToString() if scope_spans.HasField("scope") else b""
            batches.append(
                SpanBatch(
                    resource,
                    _wire(TAG_SCOPE, scope_payload, scope_spans.schema_url),
                    resource_payload,
                    scope_spans.spans,
                    [span.SerializeToString() for span in scope_spans.spans],
                )
            )
    return batches


def _hex_ids_to_base64(document: dict[str, Any]) -> None:
    for resource_spans in _items(document, "resourceSpans", "resource_spans"):
        for scope_spans in _items(resource_spans, "scopeSpans", "scope_spans"):
            for span in _items(scope_spans, "spans", "spans"):
                _convert_ids(span)
                for link in _items(span, "links", "links"):
                    _convert_ids(link)


def _items(parent: Any, camel: str, snake: str) -> list[Any]:
    if not isinstance(parent, dict):
        return []
    value = parent.get(camel, parent.get(snake))
    return value if isinstance(value, list) else []


def _convert_ids(message: Any) -> None:
    if not isinstance(message, dict):
        return
    for key in _HEX_ID_FIELDS:
        value = message.get(key)
        if isinstance(value, str):
            try:
                raw = binascii.unhexlify(value)
            except (binascii.Error, ValueError):
                message[key] = _INVALID_ID
            else:
                message[key] = base64.b64encode(raw).decode()
