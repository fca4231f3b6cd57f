"""OTLP spans as a Zipkin JSON v2 list, per the OpenTelemetry specification's Zipkin exporter mapping.

Resource and scope attributes become tags, as the OTel Collector's zipkin exporter writes them, and
endpoint attributes the zipkin receiver made go back into the endpoints, so that Zipkin in, Zipkin out
keeps a span as it was.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import math
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sampler.zipkin import Attribute, Tag

ZipkinJSON = dict[str, Any]

# INTERNAL and UNSPECIFIED have no Zipkin kind.
_KIND_NAMES = {
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
_COMPACT = (",", ":")
_HIGH_HALF_ZERO = bytes(8)
# The specification's ranking of attributes for a client or producer's remote endpoint, each with the
# port attribute that goes with an address.
_REMOTE_RANKING: tuple[tuple[str, str], ...] = (
    ("server.address", ""),
    ("net.peer.name", ""),
    ("network.peer.address", "network.peer.port"),
    ("server.socket.domain", ""),
    ("server.socket.address", "server.socket.port"),
    ("net.sock.peer.name", ""),
    ("net.sock.peer.addr", "net.sock.peer.port"),
    ("peer.hostname", ""),
    ("peer.address", ""),
    ("db.name", ""),
)


def to_zipkin_json(body: bytes, default_service_name: str) -> bytes:
    """A serialized ExportTraceServiceRequest as a Zipkin JSON v2 body.

    `default_service_name` names the local service of spans whose resource has no service.name; when
    empty, such spans have no service name.
    """
    request = ExportTraceServiceRequest.FromString(body)
    spans: list[ZipkinJSON] = []
    for resource_spans in request.resource_spans:
        resource_tags = _tags(resource_spans.resource.attributes)
        service = resource_tags.pop(Attribute.SERVICE_NAME, "") or default_service_name
        for scope_spans in resource_spans.scope_spans:
            tags = {**resource_tags, **_scope_tags(scope_spans.scope)}
            spans.extend(_zipkin_span(span, service, tags) for span in scope_spans.spans)
    _mark_shared(spans)
    return json.dumps(spans, separators=_COMPACT).encode()


def _scope_tags(scope: InstrumentationScope) -> dict[str, str]:
    """The scope's name and version under their current and deprecated keys, and its attributes."""
    tags = _tags(scope.attributes)
    if scope.name:
        tags[Tag.SCOPE_NAME] = tags[Tag.LIBRARY_NAME] = scope.name
    if scope.version:
        tags[Tag.SCOPE_VERSION] = tags[Tag.LIBRARY_VERSION] = scope.version
    return tags


def _zipkin_span(span: Span, service: str, shared_tags: dict[str, str]) -> ZipkinJSON:
    tags = {**shared_tags, **_tags(span.attributes)}
    zipkin: ZipkinJSON = {"traceId": _trace_hex(span.trace_id)}
    if span.parent_span_id:
        zipkin["parentId"] = span.parent_span_id.hex()
    zipkin["id"] = span.span_id.hex()
    kind = _KIND_NAMES.get(span.kind)
    if kind is not None:
        zipkin["kind"] = kind
    if span.name:
        zipkin["name"] = span.name
    _add_times(zipkin, span, tags)
    local = _local_endpoint(service, tags)
    if local:
        zipkin["localEndpoint"] = local
    remote = _remote_endpoint(kind, tags)
    if remote:
        zipkin["remoteEndpoint"] = remote
    if span.events:
        zipkin["annotations"] = [_annotation(event) for event in span.events]
    _add_span_tags(tags, span)
    if tags:
        zipkin["tags"] = tags
    return zipkin


def _trace_hex(trace_id: bytes) -> str:
    # A 128-bit id whose high half is zero is a 64-bit Zipkin id, written in 16 hex characters.
    if trace_id.startswith(_HIGH_HALF_ZERO):
        return trace_id[8:].hex()
    return trace_id.hex()


def _add_times(zipkin: ZipkinJSON, span: Span, tags: dict[str, str]) -> None:
    """Microseconds, rounded; a zero start is the Collector's mark of an absent Zipkin timestamp."""
    start = span.start_time_unix_nano
    end = span.end_time_unix_nano
    if start:
        zipkin["timestamp"] = (start + 500) // 1000
    else:
        tags.pop(Attribute.START_TIME_ABSENT, None)
    if end > start:
        # Zipkin rounds a duration under a microsecond up to one.
        zipkin["duration"] = max(1, (end - start + 500) // 1000)


def _local_endpoint(service: str, tags: dict[str, str]) -> ZipkinJSON:
    endpoint: ZipkinJSON = {"serviceName": service} if service else {}
    _add_address(endpoint, tags.pop(Attribute.LOCAL_IP, ""), tags.pop(Attribute.LOCAL_PORT, ""))
    return endpoint


def _remote_endpoint(kind: str | None, tags: dict[str, str]) -> ZipkinJSON:
    """peer.service and the receiver's net.peer.* attributes; for a client or producer without
    peer.service, the first attribute of the specification's ranking."""
    endpoint: ZipkinJSON = {}
    service = tags.pop(Attribute.PEER_SERVICE, "")
    if service:
        endpoint["serviceName"] = service
    elif kind in ("CLIENT", "PRODUCER"):
        _add_ranked_remote(endpoint, tags)
    _add_address(endpoint, tags.pop(Attribute.REMOTE_IP, ""), tags.pop(Attribute.REMOTE_PORT, ""))
    return endpoint


def _add_ranked_remote(endpoint: ZipkinJSON, tags: dict[str, str]) -> None:
    for key, port_key in _REMOTE_RANKING:
        value = tags.get(key)
        if not value:
            continue
        if _is_ip(value):
            _add_address(endpoint, value, tags.get(port_key, ""))
        else:
            endpoint["serviceName"] = value
        return


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _add_address(endpoint: ZipkinJSON, ip: str, port: str) -> None:
    """Add an ip and port unless the endpoint has them already."""
    if ip and "ipv4" not in endpoint and "ipv6" not in endpoint:
        endpoint["ipv6" if ":" in ip else "ipv4"] = ip
    if port.isascii() and port.isdigit() and 0 < int(port) <= 65535 and "port" not in endpoint:
        endpoint["port"] = int(port)


def _annotation(event: Span.Event) -> ZipkinJSON:
    """An event as an annotation; its attributes, if any, rendered into the value as the spec says."""
    value = event.name
    if event.attributes or event.dropped_attributes_count:
        attributes = _attribute_values(event.attributes)
        if event.dropped_attributes_count:
            attributes["otel.dropped_attributes_count"] = event.dropped_attributes_count
        value = json.dumps({event.name: attributes}, separators=_COMPACT)
    return {"timestamp": (event.time_unix_nano + 500) // 1000, "value": value}


def _add_span_tags(tags: dict[str, str], span: Span) -> None:
    """Status, dropped counts, trace state and links: what Zipkin keeps only as tags."""
    code = span.status.code
    if code == Status.STATUS_CODE_ERROR:
        tags[Tag.STATUS_CODE] = "ERROR"
        tags[Tag.ERROR] = span.status.message
    else:
        # Zipkin takes any `error` tag for a failure.
        tags.pop(Tag.ERROR, None)
        if code == Status.STATUS_CODE_OK:
            tags[Tag.STATUS_CODE] = "OK"
    for key, count in (
        ("otel.dropped_attributes_count", span.dropped_attributes_count),
        ("otel.dropped_events_count", span.dropped_events_count),
        ("otel.dropped_links_count", span.dropped_links_count),
    ):
        if count:
            tags[key] = str(count)
    if span.trace_state:
        tags[Tag.TRACE_STATE] = span.trace_state
    for number, link in enumerate(span.links):
        attributes = json.dumps(
            {kv.key: _json_value(kv.value) for kv in link.attributes}, separators=_COMPACT
        )
        tags[f"{Tag.LINK_PREFIX}{number}"] = (
            f"{link.trace_id.hex()}|{link.span_id.hex()}|{link.trace_state}|{attributes}"
            f"|{link.dropped_attributes_count}"
        )


def _mark_shared(spans: list[ZipkinJSON]) -> None:
    """Mark a server span that has the id of a client span of its trace as shared, as Zipkin does."""
    clients = {(span["traceId"], span["id"]) for span in spans if span.get("kind") == "CLIENT"}
    if not clients:
        return
    for span in spans:
        if span.get("kind") == "SERVER" and (span["traceId"], span["id"]) in clients:
            span["shared"] = True


def _tags(attributes: Any) -> dict[str, str]:
    return {kv.key: _tag_value(kv.value) for kv in attributes}


def _attribute_values(attributes: Any) -> dict[str, Any]:
    return {kv.key: _json_value(kv.value) for kv in attributes}


def _tag_value(value: AnyValue) -> str:
    """An attribute value as a tag: booleans lower case, lists and maps as JSON, bytes as base64."""
    plain = _json_value(value)
    if isinstance(plain, str):
        return plain
    if isinstance(plain, bool):
        return "true" if plain else "false"
    if isinstance(plain, int | float):
        return str(plain)
    if plain is None:
        return ""
    return json.dumps(plain, separators=_COMPACT)


def _json_value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    if field is None:
        return None
    if field == "array_value":
        return [_json_value(item) for item in value.array_value.values]
    if field == "kvlist_value":
        return {kv.key: _json_value(kv.value) for kv in value.kvlist_value.values}
    if field == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    plain = getattr(value, field)
    # NaN and infinities have no JSON form.
    if field == "double_value" and not math.isfinite(plain):
        return str(plain)
    return plain
