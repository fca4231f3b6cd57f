"""Decoding OTLP trace requests (protobuf and the OTLP JSON mapping) into the buffer's input form."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sampler.errors import DecodeError
from sampler.otlp_wire import TAG_SPANS, frame, slice_spans

# Byte fields the OTLP JSON mapping writes as hex, where protobuf's JSON mapping expects base64.
_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")
# Replaces an id that is not valid hex: decodes to bytes no span id can have, so the span is rejected
# with a partial_success message instead of failing the whole request.
_INVALID_ID = base64.b64encode(b"\x00").decode()


def decode_protobuf(body: bytes) -> tuple[ExportTraceServiceRequest, list[bytes]]:
    """Parse a protobuf request; also returns each span's framed bytes, sliced from the body."""
    try:
        request = ExportTraceServiceRequest.FromString(body)
    except ProtobufDecodeError as error:
        raise DecodeError(f"malformed protobuf ExportTraceServiceRequest: {error}") from None
    try:
        raw_spans = slice_spans(body)
    except (ValueError, IndexError):
        raw_spans = []
    if len(raw_spans) != _span_count(request):
        # An unusual but valid layout (e.g. multi-byte tags): re-serialize instead of slicing.
        raw_spans = _serialize_spans(request)
    return request, raw_spans


def decode_json(body: bytes) -> tuple[ExportTraceServiceRequest, list[bytes]]:
    """Parse a request in the OTLP JSON mapping (hex ids, lowerCamelCase or snake_case keys)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:
        raise DecodeError(f"malformed JSON: {error}") from None
    if not isinstance(document, dict):
        raise DecodeError("malformed JSON: the body must be an object (ExportTraceServiceRequest)")
    _hex_ids_to_base64(document)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as error:
        raise DecodeError(f"invalid OTLP JSON: {error}") from None
    return request, _serialize_spans(request)


def _span_count(request: ExportTraceServiceRequest) -> int:
    return sum(
        len(scope_spans.spans)
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
    )


def _serialize_spans(request: ExportTraceServiceRequest) -> list[bytes]:
    return [
        frame(TAG_SPANS, span.SerializeToString())
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]


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
