"""Zipkin v2 spans as OTLP span batches, mapped as the OTel Collector's zipkin receiver does.

Spans are grouped into one ResourceSpans per local service (and resource tags) and one ScopeSpans per
instrumentation scope; each span is built once as an opentelemetry-proto Span and serialized once.
"""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sampler.buffer import SpanBatch
from sampler.json_body import has_lone_surrogate, may_hold_lone_surrogate
from sampler.otlp_wire import TAG_RESOURCE, TAG_SCOPE, frame
from sampler.zipkin import Attribute, Tag
from sampler.zipkin.spans import ZipkinSpan

_SPAN_KINDS = {
    "CLIENT": Span.SPAN_KIND_CLIENT,
    "SERVER": Span.SPAN_KIND_SERVER,
    "PRODUCER": Span.SPAN_KIND_PRODUCER,
    "CONSUMER": Span.SPAN_KIND_CONSUMER,
}
# otel.status_code values: the specification's, and the Collector's older spellings.
_STATUS_CODES = {
    "UNSET": Status.STATUS_CODE_UNSET,
    "OK": Status.STATUS_CODE_OK,
    "ERROR": Status.STATUS_CODE_ERROR,
}
# `error` tag values that say "failed" without saying why.
_NO_MESSAGE = frozenset({"", "true", "false"})
# Tags that are resource attributes in the semantic conventions: they go back to the resource, where an
# OTLP → Zipkin exporter took them from.
_RESOURCE_PREFIXES = (
    "service.",
    "telemetry.sdk.",
    "telemetry.auto.",
    "telemetry.distro.",
    "host.",
    "os.",
    "process.",
    "container.",
    "k8s.",
    "cloud.",
    "deployment.",
    "device.",
    "webengine.",
    "aws.ecs.",
    "aws.eks.",
    "aws.log.",
    "heroku.",
)
_RESOURCE_KEYS = frozenset({"faas.name", "faas.id", "faas.version", "faas.instance", "faas.max_memory"})
# Deeper JSON values in annotations and links are kept as JSON text.
_MAX_VALUE_DEPTH = 8
_MAX_NANOS = (1 << 64) - 1
_MAX_LINKS = 128
_FIRST_LINK = f"{Tag.LINK_PREFIX}0"
_MAX_DROPPED = (1 << 32) - 1

# (resource attributes, scope name, scope version): the spans that share one SpanBatch.
_GroupKey = tuple[tuple[tuple[str, str], ...], str, str]


def to_batches(spans: list[ZipkinSpan]) -> list[SpanBatch]:
    """The spans as SpanBatches, one per (resource, scope); `spans`' tag dicts are consumed."""
    groups: dict[_GroupKey, tuple[list[Span], list[bytes]]] = {}
    for zipkin_span in spans:
        tags = zipkin_span.tags
        key = (_pop_resource(zipkin_span, tags), *_pop_scope(tags))
        span = _span(zipkin_span, tags)
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [])
        group[0].append(span)
        group[1].append(span.SerializeToString())
    resources: dict[tuple[tuple[str, str], ...], bytes] = {}
    batches: list[SpanBatch] = []
    for (attributes, scope_name, scope_version), (group_spans, payloads) in groups.items():
        resource = resources.get(attributes)
        if resource is None:
            resource = resources[attributes] = _resource(attributes)
        scope = InstrumentationScope(name=scope_name, version=scope_version).SerializeToString()
        batches.append(
            SpanBatch(
                frame(TAG_RESOURCE, resource) if resource else b"",
                frame(TAG_SCOPE, scope) if scope else b"",
                resource,
                group_spans,
                payloads,
            )
        )
    return batches


def is_resource_key(key: str) -> bool:
    """Whether a tag names a resource attribute of the semantic conventions."""
    return key.startswith(_RESOURCE_PREFIXES) or key in _RESOURCE_KEYS


def _pop_resource(zipkin_span: ZipkinSpan, tags: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The span's resource attributes: service.name from the local endpoint, resource tags."""
    moved = {key: tags.pop(key) for key in [key for key in tags if is_resource_key(key)]}
    local = zipkin_span.local
    if local is not None and local.service_name:
        moved[Attribute.SERVICE_NAME] = local.service_name
    if not moved:
        return ()
    service = moved.pop(Attribute.SERVICE_NAME, None)
    attributes = tuple(sorted(moved.items()))
    return ((Attribute.SERVICE_NAME, service), *attributes) if service is not None else attributes


def _pop_scope(tags: dict[str, str]) -> tuple[str, str]:
    if not tags:
        return "", ""
    name = tags.pop(Tag.SCOPE_NAME, None)
    version = tags.pop(Tag.SCOPE_VERSION, None)
    library_name = tags.pop(Tag.LIBRARY_NAME, "")
    library_version = tags.pop(Tag.LIBRARY_VERSION, "")
    return (library_name if name is None else name), (library_version if version is None else version)


def _resource(attributes: tuple[tuple[str, str], ...]) -> bytes:
    resource = Resource()
    for key, value in attributes:
        resource.attributes.add(key=key).value.string_value = value
    return resource.SerializeToString()


def _span(zipkin_span: ZipkinSpan, tags: dict[str, str]) -> Span:
    span = Span(
        trace_id=zipkin_span.trace_id,
        span_id=zipkin_span.span_id,
        # A span whose parent is itself is a root, as in the Collector.
        parent_span_id=b"" if zipkin_span.parent_id == zipkin_span.span_id else zipkin_span.parent_id,
        name=zipkin_span.name,
        kind=_kind(zipkin_span.kind, tags),
        start_time_unix_nano=zipkin_span.start_ns or 0,
        end_time_unix_nano=min(_MAX_NANOS, (zipkin_span.start_ns or 0) + zipkin_span.duration_ns),
    )
    if tags:
        span.trace_state = tags.pop(Tag.TRACE_STATE, "")
        _pop_status(span.status, tags)
        if _FIRST_LINK in tags:
            _pop_links(span, tags)
    attributes = span.attributes
    for key, value in tags.items():
        attributes.add(key=key).value.string_value = value
    for key, endpoint_value in _endpoint_attributes(zipkin_span):
        if key not in tags:
            _set_value(attributes.add(key=key).value, endpoint_value)
    if zipkin_span.start_ns is None:
        attributes.add(key=Attribute.START_TIME_ABSENT).value.bool_value = True
    for nanos, value in zipkin_span.annotations:
        _add_event(span, nanos, value)
    return span


def _kind(kind: str, tags: dict[str, str]) -> Span.SpanKind.ValueType:
    if kind:
        return _SPAN_KINDS[kind]
    if tags and tags.pop(Tag.SPAN_KIND, None) == "internal":
        return Span.SPAN_KIND_INTERNAL
    return Span.SPAN_KIND_UNSPECIFIED


def _pop_status(status: Status, tags: dict[str, str]) -> None:
    """otel.status_code (and its description), then `error`: any value marks the span failed."""
    code = tags.pop(Tag.STATUS_CODE, None)
    if code is not None:
        status.code = _STATUS_CODES.get(code.upper().removeprefix("STATUS_CODE_"), Status.STATUS_CODE_UNSET)
        status.message = tags.pop(Tag.STATUS_DESCRIPTION, "")
    error = tags.pop(Tag.ERROR, None)
    if error is not None:
        status.code = Status.STATUS_CODE_ERROR
        if not status.message and error not in _NO_MESSAGE:
            status.message = error


def _pop_links(span: Span, tags: dict[str, str]) -> None:
    """Links from `otlp.link.N` tags, as the Collector writes them; a malformed one stays a tag."""
    for number in range(_MAX_LINKS):
        key = f"{Tag.LINK_PREFIX}{number}"
        value = tags.get(key)
        if value is None or not _add_link(span, value):
            return
        del tags[key]


def _add_link(span: Span, value: str) -> bool:
    trace_hex, _, rest = value.partition("|")
    span_hex, _, rest = rest.partition("|")
    trace_state, _, rest = rest.partition("|")
    attributes_json, _, dropped = rest.rpartition("|")
    attributes = _json_object(attributes_json)
    try:
        trace_id = bytes.fromhex(trace_hex)
        span_id = bytes.fromhex(span_hex)
    except ValueError:
        return False
    dropped_count = _count(dropped)
    if len(trace_id) != 16 or len(span_id) != 8 or attributes is None or dropped_count is None:
        return False
    link = span.links.add(trace_id=trace_id, span_id=span_id, trace_state=trace_state)
    link.dropped_attributes_count = dropped_count
    for key, item in attributes.items():
        _set_value(link.attributes.add(key=key).value, item)
    return True


def _endpoint_attributes(zipkin_span: ZipkinSpan) -> list[tuple[str, str | int]]:
    """The Collector's span attributes for the endpoints; Zipkin's ipv6 wins over ipv4."""
    found: list[tuple[str, str | int]] = []
    local = zipkin_span.local
    if local is not None:
        if local.ipv6 or local.ipv4:
            found.append((Attribute.LOCAL_IP, local.ipv6 or local.ipv4))
        if local.port:
            found.append((Attribute.LOCAL_PORT, local.port))
    remote = zipkin_span.remote
    if remote is not None:
        if remote.service_name:
            found.append((Attribute.PEER_SERVICE, remote.service_name))
        if remote.ipv6 or remote.ipv4:
            found.append((Attribute.REMOTE_IP, remote.ipv6 or remote.ipv4))
        if remote.port:
            found.append((Attribute.REMOTE_PORT, remote.port))
    return found


def _add_event(span: Span, nanos: int, value: str) -> None:
    """An annotation as an event; the value's event attributes, if it carries some, are read back."""
    event = span.events.add(time_unix_nano=nanos)
    name, attributes, dropped = _annotation_parts(value)
    event.name = name
    event.dropped_attributes_count = dropped
    for key, item in attributes.items():
        _set_value(event.attributes.add(key=key).value, item)


def _annotation_parts(value: str) -> tuple[str, dict[str, Any], int]:
    """(name, attributes, dropped attributes) of an annotation value.

    Two writers put attributes into the value: the OTel exporters, as the specification says, write
    `{"name": {attributes}}`; the Collector writes `name|{attributes}|dropped count`.
    """
    if value.startswith("{") and value.endswith("}"):
        document = _json_object(value)
        if document is not None and len(document) == 1:
            ((name, attributes),) = document.items()
            if isinstance(attributes, dict):
                return name, attributes, 0
    elif "|" in value:
        name, _, rest = value.partition("|")
        attributes_json, _, dropped = rest.rpartition("|")
        attributes = _json_object(attributes_json)
        dropped_count = _count(dropped)
        if attributes is not None and dropped_count is not None:
            return name, attributes, dropped_count
    return value, {}, 0


def _json_object(text: str) -> dict[str, Any] | None:
    if not text.startswith("{"):
        return None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or (may_hold_lone_surrogate(text) and has_lone_surrogate(document)):
        return None
    return document


def _count(text: str) -> int | None:
    """A dropped-attributes count written in decimal, capped at uint32; None when `text` is not one."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    # int() refuses over 4300 digits; any count over 10 digits is above the cap anyway.
    return _MAX_DROPPED if len(digits) > 10 else min(int(digits or "0"), _MAX_DROPPED)


def _set_value(target: AnyValue, value: Any, depth: int = 0) -> None:
    """Set an AnyValue from a JSON value: strings, booleans, numbers, lists and objects keep their type."""
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int):
        if -(1 << 63) <= value < (1 << 63):
            target.int_value = value
        else:
            target.string_value = str(value)
    elif isinstance(value, float):
        target.double_value = value
    elif depth >= _MAX_VALUE_DEPTH and isinstance(value, list | dict):
        target.string_value = json.dumps(value)
    elif isinstance(value, list):
        values = target.array_value.values
        for item in value:
            _set_value(values.add(), item, depth + 1)
    elif isinstance(value, dict):
        entries = target.kvlist_value.values
        for key, item in value.items():
            _set_value(entries.add(key=key).value, item, depth + 1)
