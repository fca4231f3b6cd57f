"""What the fuzz tests and the atheris targets share: the decoders by name, the pipeline a decoded body goes
through (trace buffer, decider, a checking exporter), real seed bodies and byte-level mutations of them.

The property every target checks: a body is either refused with a DecodeError (a 400) or its spans go
through the buffer and the decider, and what leaves is a valid OTLP request, without anything raising.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable, Sequence
from functools import cache, partial
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from py_zipkin.encoding.protobuf import zipkin_pb2

from policies.registry import POLICY_TYPES, build_policies
from sampler.buffer import DecisionCache, SpanBatch, Trace, TraceBuffer
from sampler.config import TailSamplingConfig
from sampler.decider import Decider
from sampler.errors import DecodeError
from sampler.metrics import Metrics
from sampler.otlp_wire import SpanGroup, encode_request, encode_varint, iter_fields
from sampler.receivers.otlp_decode import decode_json, decode_protobuf
from sampler.receivers.zipkin import decode as decode_zipkin
from sampler.zipkin.from_otlp import to_zipkin_json
from sampler.zipkin.spans import parse_json, parse_proto3
from tests.conftest import ROOT
from tests.otlp_data import make_request, otlp_json

Decode = Callable[[bytes], list[SpanBatch]]

DECODERS: dict[str, Decode] = {
    "protobuf": decode_protobuf,
    "json": decode_json,
    "zipkin_json": partial(decode_zipkin, parse=parse_json),
    "zipkin_proto3": partial(decode_zipkin, parse=parse_proto3),
}
ZIPKIN_FILES = ("yelp", "envoy", "messaging")

# Small limits, so that a few spans already reach every early decision (span count, size, trace count).
_SAMPLING: dict[str, Any] = {
    "num_traces": 8,
    "max_spans_per_trace": 6,
    "max_buffered_spans": 24,
    "maximum_trace_size_bytes": 16384,
    "decision_cache": {"sampled_cache_size": 1000, "non_sampled_cache_size": 1000},
    # Policies that read the summary, attributes (extracted at ingest), every span and the tracestate;
    # always_sample keeps every trace, so that every span is checked on its way out.
    "policies": [
        {"name": "all", "type": "always_sample"},
        {"name": "half", "type": "probabilistic", "probabilistic": {"sampling_percentage": 50}},
        {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
        {"name": "slow", "type": "latency", "latency": {"threshold_ms": 100}},
        {
            "name": "route",
            "type": "string_attribute",
            "string_attribute": {"key": "http.route", "values": ["/a"]},
        },
        {
            "name": "service",
            "type": "string_attribute",
            "string_attribute": {"key": "service.name", "values": ["x"]},
        },
        {"name": "state", "type": "trace_state", "trace_state": {"key": "ot", "values": ["th:8"]}},
    ],
}


def _clock() -> float:
    return 1000.0


class CheckingExporter:
    """An exporter that checks each export is a valid OTLP request of the announced span count, and that
    the Zipkin exporter's mapping takes it."""

    name = "fuzz"
    capacity = 1 << 30

    def __init__(self) -> None:
        self.spans = 0

    def export(self, groups: list[SpanGroup], span_count: int) -> None:
        body = encode_request(groups)
        request = ExportTraceServiceRequest.FromString(body)
        spans = [span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
        assert len(spans) == span_count
        for span in spans:
            assert len(span.trace_id) == 16 and any(span.trace_id), span.trace_id
            assert len(span.span_id) == 8 and any(span.span_id), span.span_id
            assert all(len(link.trace_id) == 16 and len(link.span_id) == 8 for link in span.links)
        json.loads(to_zipkin_json(body, "fuzz"))
        self.spans += span_count

    async def wait_for_room(self, span_count: int) -> None:
        return None

    async def start(self) -> None:
        return None

    async def shutdown(self, timeout: float) -> None:
        return None


class Pipeline:
    """A trace buffer and a decider wired as the gateway wires them, on a fixed clock."""

    def __init__(self) -> None:
        settings = TailSamplingConfig.model_validate(_SAMPLING)
        self.metrics = Metrics()
        # The built-in types only: looking up plugins' entry points would cost more than a run.
        self.policies = build_policies(settings.policies, "tail_sampling.policies", types=POLICY_TYPES)
        decisions = DecisionCache(1000, 1000)
        keys = frozenset().union(*(policy.attribute_keys for policy in self.policies))
        self.buffer = TraceBuffer(settings, keys, decisions, _clock)
        self.exporter = CheckingExporter()
        self.decider = Decider(
            self.buffer,
            self.policies,
            [self.exporter],
            decisions,
            self.metrics,
            _clock,
            settings.decision_tick,
            record_policy=True,
            adjusted_counts=True,
        )
        self.buffer.connect(self._decide, self.decider.forward_late)

    def run(self, decode: Decode, body: bytes) -> bool:
        """Decode `body` and put its spans through the buffer and the decider, then once more, when they are
        all late spans; False when the body was refused with a DecodeError."""
        try:
            batches = decode(body)
        except DecodeError:
            return False
        for _ in range(2):
            self.buffer.add_spans(batches)
            self._decide(self.buffer.pop_all(), None)
            # Decoded again: the Zipkin mapping consumes its spans' tags.
            batches = decode(body)
        assert not self._failed_policies(), f"policies raised: {self._failed_policies()}"
        return True

    def _decide(self, traces: list[Trace], reason: str | None) -> None:
        for trace in traces:
            check_trace(trace)
        self.decider.decide(traces, reason)

    def _failed_policies(self) -> list[str]:
        """The policies that raised (the decider logs it and counts an `error` decision)."""
        return [
            sample.labels["policy"]
            for metric in self.metrics.policy_decisions.collect()
            for sample in metric.samples
            if sample.labels.get("decision") == "error" and sample.name.endswith("_total")
        ]


def check_trace(trace: Trace) -> None:
    """A decided trace's spans parse, and its groups account for every span it counted."""
    trace.spans()
    groups, invalid = trace.span_groups()
    assert sum(count for _, _, count in groups) + invalid == trace.span_count


def run(decoder: str, body: bytes) -> bool:
    """`body` through a fresh pipeline with the named decoder; False when it was refused (a 400)."""
    return Pipeline().run(DECODERS[decoder], body)


def _with_fixed_ids(build: Callable[[], ExportTraceServiceRequest]) -> ExportTraceServiceRequest:
    """What `build` returns with the module random seeded, so that seeds are the same bytes every run."""
    state = random.getstate()
    random.seed(20240601)
    try:
        request = build()
    finally:
        random.setstate(state)
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                span.start_time_unix_nano = 1_700_000_000_000_000_000
                span.end_time_unix_nano = 1_700_000_000_200_000_000
    return request


def otlp_json_request(document: dict[str, Any]) -> ExportTraceServiceRequest:
    """An ExportTraceServiceRequest from the OTLP JSON mapping (hex ids) of one."""
    for resource_spans in document.get("resourceSpans", []):
        for scope_spans in resource_spans.get("scopeSpans", []):
            for span in scope_spans.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64encode(bytes.fromhex(span[key])).decode()
    return json_format.ParseDict(document, ExportTraceServiceRequest())


def zipkin_proto3(spans: list[dict[str, Any]]) -> bytes:
    """Zipkin JSON v2 spans as a proto3 ListOfSpans, as py_zipkin writes them."""
    message = zipkin_pb2.ListOfSpans()
    for item in spans:
        span = message.spans.add(
            trace_id=bytes.fromhex(item["traceId"]),
            id=bytes.fromhex(item["id"]),
            parent_id=bytes.fromhex(item.get("parentId", "")),
            name=item.get("name", ""),
            timestamp=item.get("timestamp", 0),
            duration=item.get("duration", 0),
            kind=zipkin_pb2.Span.Kind.Value(item.get("kind", "SPAN_KIND_UNSPECIFIED")),
        )
        for key, field in (("localEndpoint", span.local_endpoint), ("remoteEndpoint", span.remote_endpoint)):
            endpoint = item.get(key)
            if endpoint is not None:
                field.service_name = endpoint.get("serviceName", "")
                field.port = endpoint.get("port", 0)
                if "ipv4" in endpoint:
                    field.ipv4 = bytes(int(part) for part in endpoint["ipv4"].split("."))
        for annotation in item.get("annotations", []):
            span.annotations.add(timestamp=annotation["timestamp"], value=annotation["value"])
        span.tags.update(item.get("tags", {}))
    return message.SerializeToString()


@cache
def seeds(decoder: str) -> tuple[bytes, ...]:
    """Real bodies for a decoder: built with opentelemetry-proto, the OTLP example, the Zipkin data files."""
    example = json.loads((ROOT / "tests" / "data" / "otlp" / "trace.json").read_bytes())
    built = _with_fixed_ids(lambda: make_request(traces=3, spans_per_trace=3, error_every=2))
    zipkin = [
        json.loads((ROOT / "tests" / "data" / "zipkin" / f"{name}.json").read_bytes())
        for name in ZIPKIN_FILES
    ]
    if decoder == "protobuf":
        return (built.SerializeToString(), otlp_json_request(example).SerializeToString())
    if decoder == "json":
        return (otlp_json(built), json.dumps(example).encode())
    if decoder == "zipkin_json":
        return tuple(json.dumps(spans).encode() for spans in zipkin)
    return tuple(zipkin_proto3(spans) for spans in zipkin)


# A mutation: (kind, position, argument). Positions and arguments are taken modulo what fits the body.
Edit = tuple[str, int, int]
EDIT_KINDS = ("flip", "truncate", "delete", "duplicate", "splice", "length", "byte")


def length_fields(body: bytes) -> list[tuple[int, int, int]]:
    """(start, end, value) of the length varint of every length-delimited field of a protobuf message,
    nested messages included (a field whose payload does not read as fields is a leaf)."""
    found: list[tuple[int, int, int]] = []

    def walk(start: int, end: int, depth: int) -> None:
        try:
            fields = iter_fields(body, start, end)
        except (ValueError, IndexError):
            return
        for _, payload_start, payload_end in fields:
            length = payload_end - payload_start
            found.append((payload_start - len(encode_varint(length)), payload_start, length))
            if depth < 8:
                walk(payload_start, payload_end, depth + 1)

    walk(0, len(body), 0)
    return found


# Lengths a corrupted length field gets: off by one, zero, past the end, the varint limits.
_LENGTHS = (0, 1, 127, 128, 16383, 16384, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, (1 << 63) - 1, (1 << 64) - 1)


def mutate(body: bytes, edits: Sequence[Edit], donors: Sequence[bytes]) -> bytes:
    """`body` with each edit applied in turn: bit flips, truncation, deleted or duplicated runs, splices
    from another body, corrupted length fields, overwritten bytes."""
    data = bytearray(body)
    for kind, position, argument in edits:
        at = position % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] ^= 1 << (argument % 8)
        elif kind == "truncate":
            del data[at:]
        elif kind == "delete":
            del data[at : at + argument % 64 + 1]
        elif kind == "duplicate":
            data[at:at] = data[at : at + argument % 256 + 1]
        elif kind == "splice" and donors:
            donor = donors[argument % len(donors)]
            cut = argument % (len(donor) + 1)
            data[at:] = donor[cut:]
        elif kind == "length":
            fields = length_fields(bytes(data))
            if fields:
                start, end, length = fields[position % len(fields)]
                choices = (*_LENGTHS, length + 1, max(0, length - 1))
                data[start:end] = encode_varint(choices[argument % len(choices)])
        elif kind == "byte" and data:
            data[at % len(data)] = argument % 256
    return bytes(data)
