"""The Zipkin v2 ⇄ OTLP mapping the Zipkin receiver and exporter share.

Zipkin → OTLP follows the OTel Collector's zipkin receiver, OTLP → Zipkin the OpenTelemetry
specification's Zipkin exporter mapping; the names below are the ones both directions agree on.
"""

from __future__ import annotations

KINDS = ("CLIENT", "SERVER", "PRODUCER", "CONSUMER")


class Tag:
    """Zipkin tags that carry OTLP fields Zipkin has no place for."""

    ERROR = "error"
    STATUS_CODE = "otel.status_code"
    STATUS_DESCRIPTION = "otel.status_description"
    SCOPE_NAME = "otel.scope.name"
    SCOPE_VERSION = "otel.scope.version"
    # The deprecated aliases of the two above, still written and read.
    LIBRARY_NAME = "otel.library.name"
    LIBRARY_VERSION = "otel.library.version"
    TRACE_STATE = "w3c.tracestate"
    SPAN_KIND = "span.kind"
    # `otlp.link.0`, `otlp.link.1`, ...: trace id|span id|trace state|attributes as JSON|dropped attributes.
    LINK_PREFIX = "otlp.link."


class Attribute:
    """OTLP attributes with a Zipkin counterpart: endpoints map to the Collector's (conventions 1.6)."""

    SERVICE_NAME = "service.name"
    PEER_SERVICE = "peer.service"
    LOCAL_IP = "net.host.ip"
    LOCAL_PORT = "net.host.port"
    REMOTE_IP = "net.peer.ip"
    REMOTE_PORT = "net.peer.port"
    # Set (true) on a span whose Zipkin timestamp was absent: its start is then the Unix epoch.
    START_TIME_ABSENT = "otel.zipkin.absentField.startTime"
