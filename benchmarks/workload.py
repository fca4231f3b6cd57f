"""Realistic OTLP/protobuf ExportTraceServiceRequest bodies, as an SDK BatchSpanProcessor sends them.

A ring of pre-serialized request templates; `BodyStream` writes fresh random trace ids into them at
recorded byte offsets, so each body costs one join and no protobuf work while ids stay unique per run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import time
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

SPANS_PER_REQUEST = 512  # BatchSpanProcessor's default max_export_batch_size
SPANS_PER_TRACE = 8
SERVICES_PER_REQUEST = 3
SPLIT_TRACES_PER_REQUEST = 4  # traces whose children go out one request before their root
SPLIT_HEAD_SPANS = 5  # children sent in the earlier request; root + 2 children follow
ERROR_TRACE_RATE = 0.02
SLOW_TRACE_RATE = 0.03
EVENT_SPAN_RATE = 0.01
DEFAULT_POOL_REQUESTS = 48

# Each tuple fills the roles (edge, backend, leaf) of one request's three ResourceSpans.
SERVICE_TRIPLES = (
    ("frontend", "checkout", "payment"),
    ("api-gateway", "orders", "inventory"),
    ("web", "accounts", "auth"),
    ("mobile-bff", "catalog", "pricing"),
)
SDKS = (("python", "1.25.0"), ("java", "1.39.0"), ("go", "1.27.0"), ("nodejs", "1.24.1"))
ROUTES = (
    ("GET", "/api/v1/orders/{order_id}"),
    ("POST", "/api/v1/cart/items"),
    ("GET", "/api/v1/products"),
    ("GET", "/api/v1/products/{product_id}"),
    ("POST", "/api/v1/checkout"),
    ("GET", "/api/v1/users/{user_id}/profile"),
    ("PUT", "/api/v1/users/{user_id}/settings"),
    ("DELETE", "/api/v1/cart/items/{item_id}"),
)
USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "okhttp/4.12.0",
    "python-requests/2.31.0",
)
SQL = (
    ("SELECT", "orders", "SELECT id, status, total FROM orders WHERE customer_id = $1 LIMIT $2"),
    ("SELECT", "products", "SELECT id, name, price FROM products WHERE id = ANY($1)"),
    ("INSERT", "cart_items", "INSERT INTO cart_items (cart_id, sku, qty) VALUES ($1, $2, $3)"),
    ("UPDATE", "accounts", "UPDATE accounts SET last_seen = now() WHERE id = $1"),
)


def _kv(key: str, value: str | bool | int) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


@dataclass(slots=True)
class _SpanPlan:
    """One span of a generated trace before it is rendered for a request's services."""

    role: int  # index into the request's service triple
    kind: int
    index: int  # position in the trace; 0 is the root
    span_id: bytes
    parent_span_id: bytes  # empty for the root
    start: int
    end: int
    error: bool
    event: bool


class _TraceFactory:
    """Generates 8-span traces (a three-service call tree) and renders them as protobuf Spans."""

    # (role, kind, parent) for span positions 0..7: edge server → internal + client → backend server →
    # db client + client → leaf server → cache/queue client.
    SHAPE = (
        (0, Span.SPAN_KIND_SERVER, -1),
        (0, Span.SPAN_KIND_INTERNAL, 0),
        (0, Span.SPAN_KIND_CLIENT, 0),
        (1, Span.SPAN_KIND_SERVER, 2),
        (1, Span.SPAN_KIND_CLIENT, 3),
        (1, Span.SPAN_KIND_CLIENT, 3),
        (2, Span.SPAN_KIND_SERVER, 5),
        (2, Span.SPAN_KIND_PRODUCER, 6),
    )

    def __init__(self, rng: random.Random, now_ns: int) -> None:
        self.rng = rng
        self.now_ns = now_ns

    def plan(self) -> list[_SpanPlan]:
        rng = self.rng
        slow = rng.random() < SLOW_TRACE_RATE
        error_at = rng.randrange(1, SPANS_PER_TRACE) if rng.random() < ERROR_TRACE_RATE else -1
        root_ms = rng.uniform(1100.0, 4000.0) if slow else rng.lognormvariate(3.3, 0.7)
        root_start = self.now_ns - rng.randrange(0, 5_000_000_000)
        span_ids = [os.urandom(8) for _ in self.SHAPE]
        plans: list[_SpanPlan] = []
        for index, (role, kind, parent) in enumerate(self.SHAPE):
            if parent < 0:
                start, end = root_start, root_start + int(root_ms * 1e6)
            else:
                p_start, p_end = plans[parent].start, plans[parent].end
                width = p_end - p_start
                start = p_start + int(width * rng.uniform(0.02, 0.2))
                end = start + int((p_end - start) * rng.uniform(0.3, 0.95))
            plans.append(
                _SpanPlan(
                    role=role,
                    kind=kind,
                    index=index,
                    span_id=span_ids[index],
                    parent_span_id=span_ids[parent] if parent >= 0 else b"",
                    start=start,
                    end=max(end, start + 1000),
                    error=index == error_at or (error_at >= 0 and index == 0),
                    event=rng.random() < EVENT_SPAN_RATE,
                )
            )
        return plans

    def render(self, plan: _SpanPlan, trace_id: bytes, services: tuple[str, ...]) -> Span:
        rng = self.rng
        method, route = rng.choice(ROUTES)
        status = 500 if plan.error else rng.choice((200, 200, 200, 200, 201, 204, 404))
        peer = services[min(plan.role + 1, 2)]
        thread = _kv("thread.id", rng.randrange(1, 400))
        attrs: list[KeyValue]
        if plan.kind == Span.SPAN_KIND_SERVER:
            name = f"{method} {route}"
            attrs = [
                _kv("http.method", method),
                _kv("http.route", route),
                _kv("http.status_code", status),
                _kv("http.scheme", "https" if plan.role == 0 else "http"),
                _kv("net.host.name", f"{services[plan.role]}.prod.internal"),
                _kv("net.host.port", 8080),
                _kv("user_agent.original", rng.choice(USER_AGENTS)),
                _kv("http.request_content_length", rng.randrange(0, 4096)),
                _kv("http.response_content_length", rng.randrange(64, 65536)),
                thread,
            ]
        elif plan.index == 4:
            operation, table, statement = rng.choice(SQL)
            name = f"{operation} {table}"
            attrs = [
                _kv("db.system", "postgresql"),
                _kv("db.name", "shop"),
                _kv("db.user", "app"),
                _kv("db.operation", operation),
                _kv("db.sql.table", table),
                _kv("db.statement", statement),
                _kv("net.peer.name", "pg-primary.prod.internal"),
                _kv("net.peer.port", 5432),
                _kv("db.rows_affected", rng.randrange(0, 50)),
                thread,
            ]
        elif plan.kind == Span.SPAN_KIND_CLIENT:
            name = f"{method}"
            attrs = [
                _kv("http.method", method),
                _kv("http.url", f"http://{peer}:8080{route}"),
                _kv("http.status_code", status),
                _kv("http.flavor", "1.1"),
                _kv("net.peer.name", peer),
                _kv("net.peer.port", 8080),
                _kv("http.response_content_length", rng.randrange(64, 65536)),
                _kv("http.resend_count", 0),
                _kv("rpc.retry", rng.random() < 0.05),
                thread,
            ]
        elif plan.kind == Span.SPAN_KIND_PRODUCER:
            topic = rng.choice(("order-events", "audit-log", "payment-events"))
            name = f"{topic} publish"
            attrs = [
                _kv("messaging.system", "kafka"),
                _kv("messaging.operation", "publish"),
                _kv("messaging.destination.name", topic),
                _kv("messaging.kafka.destination.partition", rng.randrange(0, 12)),
                _kv("messaging.message.body.size", rng.randrange(200, 4000)),
                _kv("messaging.kafka.message.key", f"{rng.getrandbits(48):012x}"),
                _kv("net.peer.name", "kafka-1.prod.internal"),
                _kv("net.peer.port", 9092),
                _kv("messaging.client_id", f"{services[plan.role]}-producer"),
                thread,
            ]
        else:
            function = rng.choice(("authorize", "load_session", "render_template", "validate"))
            name = function
            attrs = [
                _kv("code.function", function),
                _kv("code.namespace", f"{services[plan.role].replace('-', '_')}.handlers"),
                _kv("code.filepath", f"/app/{services[plan.role]}/handlers.py"),
                _kv("code.lineno", rng.randrange(20, 900)),
                _kv("cache.hit", rng.random() < 0.8),
                _kv("session.items", rng.randrange(0, 30)),
                _kv("enduser.authenticated", rng.random() < 0.7),
                _kv("app.tenant", f"tenant-{rng.randrange(40)}"),
                _kv("thread.name", "MainThread"),
                thread,
            ]
        span = Span(
            trace_id=trace_id,
            span_id=plan.span_id,
            parent_span_id=plan.parent_span_id,
            flags=0x101,
            name=name,
            kind=plan.kind,  # type: ignore[arg-type]
            start_time_unix_nano=plan.start,
            end_time_unix_nano=plan.end,
            attributes=attrs,
        )
        if plan.error:
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = "upstream returned 500" if plan.index == 0 else "internal error"
            event = span.events.add(name="exception", time_unix_nano=plan.end - 1000)
            event.attributes.extend(
                [
                    _kv("exception.type", "ConnectionResetError"),
                    _kv("exception.message", "connection reset by peer"),
                    _kv("exception.escaped", False),
                ]
            )
        elif plan.event:
            event = span.events.add(name="cache.miss", time_unix_nano=plan.start + 1000)
            event.attributes.append(_kv("cache.key", f"session:{self.rng.getrandbits(32):08x}"))
        return span


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """A serialized request cut at its trace-id bytes.

    `parts` alternates body segments and placeholder ids (odd positions); `slot_trace` maps each id slot
    to an index into this request's trace list. The first `carried_in` traces continue traces that began
    in the previous request of the ring; the last `carried_out` continue into the next one.
    """

    parts: tuple[bytes, ...]
    slot_trace: tuple[int, ...]
    n_traces: int
    carried_in: int
    carried_out: int
    spans: int
    body_bytes: int


@dataclass(frozen=True, slots=True)
class WorkloadPool:
    """A ring of request templates and its statistics."""

    templates: tuple[RequestTemplate, ...]
    mean_span_bytes: float  # serialized Span message size
    mean_body_bytes_per_span: float  # whole request body / spans
    error_trace_fraction: float
    slow_trace_fraction: float


def _template(
    factory: _TraceFactory,
    services: tuple[str, ...],
    resources: list[Resource],
    scopes: list[InstrumentationScope],
    units: list[list[_SpanPlan]],
    carried_in: int,
    carried_out: int,
    span_sizes: list[int],
) -> RequestTemplate:
    """Serialize one request whose traces (in order) are `units`, and record its trace-id offsets."""
    placeholders = [os.urandom(16) for _ in units]
    by_role: list[list[Span]] = [[] for _ in services]
    for trace_index, plans in enumerate(units):
        for plan in plans:
            span = factory.render(plan, placeholders[trace_index], services)
            span_sizes.append(span.ByteSize())
            by_role[plan.role].append(span)
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=resources[role],
                scope_spans=[ScopeSpans(scope=scopes[role], spans=by_role[role])],
            )
            for role in range(len(services))
        ]
    )
    body = request.SerializeToString()
    slots: list[tuple[int, int]] = []
    for trace_index, placeholder in enumerate(placeholders):
        found, pos = 0, body.find(placeholder)
        while pos >= 0:
            slots.append((pos, trace_index))
            found += 1
            pos = body.find(placeholder, pos + 16)
        if found != len(units[trace_index]):
            raise RuntimeError("trace-id placeholder found at an unexpected number of offsets")
    slots.sort()
    parts: list[bytes] = []
    cursor = 0
    for pos, _ in slots:
        parts += [body[cursor:pos], b"\0" * 16]
        cursor = pos + 16
    parts.append(body[cursor:])
    return RequestTemplate(
        parts=tuple(parts),
        slot_trace=tuple(trace_index for _, trace_index in slots),
        n_traces=len(units),
        carried_in=carried_in,
        carried_out=carried_out,
        spans=sum(len(plans) for plans in units),
        body_bytes=len(body),
    )


def build_pool(n_requests: int = DEFAULT_POOL_REQUESTS, seed: int = 1) -> WorkloadPool:
    """Generate `n_requests` templates forming a ring (split traces wrap from the last to the first)."""
    rng = random.Random(seed)
    factory = _TraceFactory(rng, time.time_ns())
    split = SPLIT_TRACES_PER_REQUEST
    full = (SPANS_PER_REQUEST - split * SPANS_PER_TRACE) // SPANS_PER_TRACE
    if full * SPANS_PER_TRACE + split * SPANS_PER_TRACE != SPANS_PER_REQUEST:
        raise ValueError("spans per request must be a multiple of spans per trace")
    # Plans of the traces split at the boundary before request i (children in i-1, root part in i).
    split_plans = [[factory.plan() for _ in range(split)] for _ in range(n_requests)]
    templates: list[RequestTemplate] = []
    span_sizes: list[int] = []
    n_traces = errors = slow = 0
    for i in range(n_requests):
        services = SERVICE_TRIPLES[i % len(SERVICE_TRIPLES)]
        language, sdk_version = SDKS[i % len(SDKS)]
        resources = [
            Resource(
                attributes=[
                    _kv("service.name", name),
                    _kv("service.namespace", "shop"),
                    _kv("service.version", f"2.{rng.randrange(20)}.{rng.randrange(10)}"),
                    _kv("service.instance.id", f"{name}-{rng.getrandbits(32):08x}"),
                    _kv("host.name", f"ip-10-0-{rng.randrange(256)}-{rng.randrange(256)}"),
                    _kv("deployment.environment", "production"),
                    _kv("telemetry.sdk.name", "opentelemetry"),
                    _kv("telemetry.sdk.language", language),
                    _kv("telemetry.sdk.version", sdk_version),
                    _kv("process.pid", rng.randrange(1, 65536)),
                ]
            )
            for name in services
        ]
        scopes = [
            InstrumentationScope(name=f"opentelemetry.instrumentation.{lib}", version="0.46b0")
            for lib in ("aiohttp_server", "requests", "psycopg")
        ]
        # A split trace's head part is children only; its root follows in the next request.
        carried_in = [[plans[0], *plans[SPLIT_HEAD_SPANS + 1 :]] for plans in split_plans[i]]
        whole = [factory.plan() for _ in range(full)]
        carried_out = [plans[1 : SPLIT_HEAD_SPANS + 1] for plans in split_plans[(i + 1) % n_requests]]
        for plans in [*whole, *split_plans[i]]:
            n_traces += 1
            errors += any(p.error for p in plans)
            slow += plans[0].end - plans[0].start > 1_000_000_000
        templates.append(
            _template(
                factory,
                services,
                resources,
                scopes,
                [*carried_in, *whole, *carried_out],
                carried_in=len(carried_in),
                carried_out=len(carried_out),
                span_sizes=span_sizes,
            )
        )
    total_spans = sum(t.spans for t in templates)
    return WorkloadPool(
        templates=tuple(templates),
        mean_span_bytes=sum(span_sizes) / len(span_sizes),
        mean_body_bytes_per_span=sum(t.body_bytes for t in templates) / total_spans,
        error_trace_fraction=errors / n_traces,
        slow_trace_fraction=slow / n_traces,
    )


class BodyStream:
    """Endless request bodies from a pool, each trace with a fresh random 16-byte id.

    Ids are drawn from os.urandom: 128 random bits, so a repeat within a run is not a practical concern.
    A split trace keeps its id across the two consecutive bodies that carry it.
    """

    def __init__(self, pool: WorkloadPool) -> None:
        self._templates = pool.templates
        self._getters = [itemgetter(*t.slot_trace) for t in pool.templates]
        self._parts = [list(t.parts) for t in pool.templates]
        self._next_index = 0
        self._carry = self._fresh_ids(self._templates[0].carried_in)

    @staticmethod
    def _fresh_ids(count: int) -> list[bytes]:
        raw = os.urandom(16 * count)
        return [raw[k : k + 16] for k in range(0, 16 * count, 16)]

    def next_body(self) -> tuple[bytes, int]:
        """The next body and its span count."""
        index = self._next_index
        self._next_index = (index + 1) % len(self._templates)
        template = self._templates[index]
        ids = self._carry + self._fresh_ids(template.n_traces - template.carried_in)
        self._carry = ids[len(ids) - template.carried_out :] if template.carried_out else []
        parts = self._parts[index]
        parts[1::2] = self._getters[index](ids)
        return b"".join(parts), template.spans


def save_pool(pool: WorkloadPool, path: Path) -> None:
    """Write the pool as plain tuples, so it loads whichever module name this file ran under."""
    fields = [getattr(t, name) for t in pool.templates for name in RequestTemplate.__slots__]
    stats = (
        pool.mean_span_bytes,
        pool.mean_body_bytes_per_span,
        pool.error_trace_fraction,
        pool.slow_trace_fraction,
    )
    path.write_bytes(pickle.dumps((fields, stats), protocol=pickle.HIGHEST_PROTOCOL))


def load_pool(path: Path) -> WorkloadPool:
    fields, stats = pickle.loads(path.read_bytes())
    width = len(RequestTemplate.__slots__)
    templates = tuple(RequestTemplate(*fields[k : k + width]) for k in range(0, len(fields), width))
    return WorkloadPool(templates, *stats)


def describe(pool: WorkloadPool) -> dict[str, Any]:
    spans = sum(t.spans for t in pool.templates)
    return {
        "templates": len(pool.templates),
        "spans_per_request": SPANS_PER_REQUEST,
        "spans_per_trace": SPANS_PER_TRACE,
        "pool_spans": spans,
        "mean_span_bytes": round(pool.mean_span_bytes, 1),
        "mean_body_bytes_per_span": round(pool.mean_body_bytes_per_span, 1),
        "error_trace_fraction": round(pool.error_trace_fraction, 4),
        "slow_trace_fraction": round(pool.slow_trace_fraction, 4),
    }


def _verify(pool: WorkloadPool, bodies: int) -> None:
    """Parse generated bodies; check span counts, trace completeness and parent links."""
    stream = BodyStream(pool)
    traces: dict[bytes, list[Span]] = {}
    for _ in range(bodies):
        body, spans = stream.next_body()
        request = ExportTraceServiceRequest.FromString(body)
        count = 0
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    count += 1
                    traces.setdefault(span.trace_id, []).append(span)
        if count != spans:
            raise AssertionError(f"body holds {count} spans, expected {spans}")
    # Only the first body's carried-in parts and the last body's carried-out parts are incomplete.
    incomplete = [t for t in traces.values() if len(t) != SPANS_PER_TRACE]
    if len(incomplete) > 2 * SPLIT_TRACES_PER_REQUEST:
        raise AssertionError(f"{len(incomplete)} incomplete traces")
    for spans_of_trace in traces.values():
        if len(spans_of_trace) != SPANS_PER_TRACE:
            continue
        ids = {s.span_id for s in spans_of_trace}
        if sum(not s.parent_span_id for s in spans_of_trace) != 1 or any(
            s.parent_span_id and s.parent_span_id not in ids for s in spans_of_trace
        ):
            raise AssertionError("trace with a broken parent chain")
    print(f"verified {bodies} bodies: {len(traces)} trace ids, {len(incomplete)} edge partials")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=DEFAULT_POOL_REQUESTS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write the pool (pickle) for loadgen.py --pool")
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="parse N bodies")
    args = parser.parse_args()
    started = time.perf_counter()
    pool = build_pool(args.requests, args.seed)
    print(f"built in {time.perf_counter() - started:.2f}s: {describe(pool)}")
    stream = BodyStream(pool)
    started = time.perf_counter()
    n = 2000
    for _ in range(n):
        stream.next_body()
    per_body = (time.perf_counter() - started) / n
    print(f"id rewrite: {per_body * 1e6:.1f} µs per body ({SPANS_PER_REQUEST / per_body:,.0f} spans/s)")
    if args.verify:
        _verify(pool, args.verify)
    if args.out:
        save_pool(pool, args.out)


if __name__ == "__main__":
    main()
