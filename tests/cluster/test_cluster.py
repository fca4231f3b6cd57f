"""Gateways in a cluster on loopback: spans sent round-robin to every member reach the owner of their
trace; each trace is decided once, complete, and as a single gateway would decide it; members joining,
leaving (SIGTERM) and Redis going away lose nothing."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from sampler.app import Gateway
from sampler.cluster.forward import Forwarder
from sampler.cluster.node import LEFT, MAX_HOPS, ROOM_WAIT
from sampler.cluster.ring import Ring
from sampler.config import ForwardConfig, parse_config
from tests.cluster.redis_server import RedisServer
from tests.cluster.summarized import summarize
from tests.conftest import Downstream, free_port, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import make_request, post, send
from tests.test_cli import wait_ready
from tests.test_outage import run_gateway

# Kept: traces with an error, and 25 % of the others by trace id (the same on every member).
POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "sample", "type": "probabilistic", "probabilistic": {"sampling_percentage": 25}},
]
SPANS_PER_TRACE = 6


def single_config(downstream: Downstream) -> dict[str, Any]:
    return gateway_config(
        downstream, policies=POLICIES, decision_wait="1s", decision_wait_after_root_received="0.3s"
    )


def member_config(downstream: Downstream, endpoint: str, membership: dict[str, Any]) -> dict[str, Any]:
    config = single_config(downstream)
    config["cluster"] = {"endpoint": endpoint, **membership, "forward": {"max_delay": "0.01s"}}
    return config


def make_traces(rng: random.Random, count: int) -> list[list[Span]]:
    """`count` traces of SPANS_PER_TRACE spans, every third with an error on one child."""
    traces = []
    for number in range(count):
        trace_id = rng.randbytes(16)
        root_id = rng.randbytes(8)
        spans = []
        for index in range(SPANS_PER_TRACE):
            span = Span(
                trace_id=trace_id,
                span_id=root_id if index == 0 else rng.randbytes(8),
                parent_span_id=b"" if index == 0 else root_id,
                name=f"op {index}",
                start_time_unix_nano=1_700_000_000_000_000_000 + index,
                end_time_unix_nano=1_700_000_000_000_100_000 + index,
            )
            if number % 3 == 0 and index == 2:
                span.status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR))
            spans.append(span)
        traces.append(spans)
    return traces


def requests_round_robin(traces: list[list[Span]], members: int) -> list[list[ExportTraceServiceRequest]]:
    """Every span of every trace goes to the next member in turn: most spans reach a non-owner."""
    per_member: list[list[Span]] = [[] for _ in range(members)]
    turn = 0
    for spans in traces:
        for span in spans:
            per_member[turn % members].append(span)
            turn += 1
    requests: list[list[ExportTraceServiceRequest]] = []
    for spans in per_member:
        chunks = [spans[i : i + 50] for i in range(0, len(spans), 50)]
        requests.append([request_of(chunk) for chunk in chunks])
    return requests


def request_of(spans: list[Span]) -> ExportTraceServiceRequest:
    resource = ResourceSpans(scope_spans=[ScopeSpans(spans=spans)])
    resource.resource.attributes.append(KeyValue(key="service.name", value=AnyValue(string_value="shop")))
    return ExportTraceServiceRequest(resource_spans=[resource])


class Cluster:
    """Gateways started in this event loop, stopped at the end."""

    def __init__(self, downstream: Downstream) -> None:
        self.downstream = downstream
        self.gateways: list[Gateway] = []

    async def start(self, config: dict[str, Any]) -> Gateway:
        gateway = Gateway(parse_config(config))
        await gateway.start()
        self.gateways.append(gateway)
        return gateway

    async def stop(self, gateway: Gateway) -> None:
        await gateway.stop()
        self.gateways.remove(gateway)

    async def stop_all(self) -> None:
        await asyncio.gather(*(gateway.stop() for gateway in self.gateways))
        self.gateways.clear()


@pytest.fixture
async def cluster(downstream: Downstream) -> AsyncIterator[Cluster]:
    started = Cluster(downstream)
    yield started
    await started.stop_all()


@pytest.fixture
def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


async def send_all(gateways: list[Gateway], requests: list[list[ExportTraceServiceRequest]]) -> None:
    async def send_to(gateway: Gateway, batch: list[ExportTraceServiceRequest]) -> None:
        for request in batch:
            await send(receiver_url(gateway), request)

    await asyncio.gather(
        *(send_to(gateway, batch) for gateway, batch in zip(gateways, requests, strict=True))
    )


def delivered(downstream: Downstream) -> Counter[tuple[bytes, bytes]]:
    return Counter((span.trace_id, span.span_id) for _, _, span in downstream.spans())


async def single_gateway_keeps(traces: list[list[Span]]) -> set[bytes]:
    """The trace ids one gateway (no cluster) keeps of `traces`."""
    downstream = Downstream()
    await downstream.start()
    gateway = Gateway(parse_config(single_config(downstream)))
    await gateway.start()
    try:
        for request in requests_round_robin(traces, 1)[0]:
            await send(receiver_url(gateway), request)
        await wait_for(lambda: decided([gateway]) == len(traces))
    finally:
        await gateway.stop()
        await downstream.stop()
    return {span.trace_id for _, _, span in downstream.spans()}


def decided(gateways: list[Gateway]) -> float:
    return sum(
        metric(gateway, "tailgate_traces_decided_total", decision=decision)
        for gateway in gateways
        for decision in ("kept", "dropped")
    )


def forwarded_spans(gateway: Gateway) -> float:
    value = 0.0
    for family in gateway.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "tailgate_cluster_forwarded_spans_total":
                value += sample.value
    return value


def check_complete(label: str, traces: list[list[Span]], kept: set[bytes], downstream: Downstream) -> None:
    counts = delivered(downstream)
    spans_of = {spans[0].trace_id: {span.span_id for span in spans} for spans in traces}
    arrived: dict[bytes, set[bytes]] = {}
    for trace_id, span_id in counts:
        arrived.setdefault(trace_id, set()).add(span_id)
    duplicates = sum(counts.values()) - len(counts)
    lost = sum(len(spans_of[trace_id] - arrived.get(trace_id, set())) for trace_id in kept)
    print(
        f"\n{label}: {len(traces)} traces, {len(kept)} kept by a single gateway; "
        f"{len(arrived)} arrived, lost spans {lost}, duplicates {duplicates}"
    )
    assert set(arrived) == kept
    assert lost == 0
    assert duplicates == 0
    # One export per trace: decided once, by its owner, with all its spans.
    requests_of: dict[bytes, set[int]] = {}
    for number, request in enumerate(downstream.requests):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    requests_of.setdefault(span.trace_id, set()).add(number)
    assert all(len(requests_of[trace_id]) == 1 for trace_id in kept)


# A member's `cluster` settings given every member's endpoint.
Membership = Callable[[list[str]], dict[str, Any]]


async def start_members(cluster: Cluster, count: int, membership: Membership) -> list[Gateway]:
    endpoints = [f"127.0.0.1:{free_port()}" for _ in range(count)]
    configs = [member_config(cluster.downstream, endpoint, membership(endpoints)) for endpoint in endpoints]
    return list(await asyncio.gather(*(cluster.start(config) for config in configs)))


def static(endpoints: list[str]) -> dict[str, Any]:
    return {"peers": endpoints}


async def test_three_static_members_decide_each_trace_once_and_whole(cluster: Cluster) -> None:
    traces = make_traces(random.Random(1), 120)
    kept = await single_gateway_keeps(traces)
    gateways = await start_members(cluster, 3, static)
    await send_all(gateways, requests_round_robin(traces, 3))
    await wait_for(lambda: decided(gateways) == len(traces), timeout=15)
    await wait_for(lambda: len(delivered(cluster.downstream)) == len(kept) * SPANS_PER_TRACE, timeout=10)
    forwarded = sum(forwarded_spans(gateway) for gateway in gateways)
    print(f"forwarded {forwarded:g} of {len(traces) * SPANS_PER_TRACE} spans")
    check_complete("3 static members", traces, kept, cluster.downstream)
    assert 0 < len(kept) < len(traces)
    assert forwarded > 0


@pytest.mark.parametrize("hops", [1, MAX_HOPS])
async def test_spans_a_peer_sends_to_a_member_that_does_not_own_them_are_routed_on(
    cluster: Cluster, hops: int
) -> None:
    """Members see a change of members at slightly different times, so a peer may forward spans to a
    member that no longer owns their trace: it routes them on, unless they were forwarded MAX_HOPS
    times already; then it keeps them rather than let them bounce."""
    traces = make_traces(random.Random(7), 60)
    kept = await single_gateway_keeps(traces)
    gateways = await start_members(cluster, 3, static)
    member = gateways[0].cluster
    assert member is not None
    foreign = [spans for spans in traces if member.ring.owner(spans[0].trace_id) != member.member_id]
    body = request_of([span for spans in traces for span in spans]).SerializeToString()
    forwarder = Forwarder(ForwardConfig())
    try:
        assert forwarder.send_traces(member.member_id, summarize(body), hops)
        assert await forwarder.flush(10)
    finally:
        await forwarder.close()
    await wait_for(lambda: decided(gateways) == len(traces), timeout=15)
    await wait_for(lambda: len(delivered(cluster.downstream)) == len(kept) * SPANS_PER_TRACE, timeout=10)
    check_complete(f"forwarded with hops {hops}", traces, kept, cluster.downstream)
    routed_on = forwarded_spans(gateways[0])
    print(f"{routed_on:g} of {len(traces) * SPANS_PER_TRACE} spans routed on")
    if hops < MAX_HOPS:
        assert 0 < len(foreign) < len(traces)
        assert routed_on == len(foreign) * SPANS_PER_TRACE
        assert decided(gateways[:1]) == len(traces) - len(foreign)
    else:
        assert routed_on == 0
        assert decided(gateways[:1]) == len(traces)


async def test_invalid_span_ids_of_another_members_traces_are_refused_in_the_clients_reply(
    cluster: Cluster,
) -> None:
    """The member a request reaches checks every span before it forwards any: the client's
    partial_success counts the spans of other members' traces it refused too."""
    gateways = await start_members(cluster, 2, static)
    member = gateways[0].cluster
    assert member is not None
    traces = [
        spans
        for spans in make_traces(random.Random(12), 40)
        if member.ring.owner(spans[0].trace_id) != member.member_id
    ][:5]
    for spans in traces:
        spans[1].span_id = b"\x01\x02"  # not 8 bytes
    body = request_of([span for spans in traces for span in spans]).SerializeToString()
    status, _, reply = await post(receiver_url(gateways[0]), body, {"Content-Type": "application/x-protobuf"})
    assert status == 200
    response = ExportTraceServiceResponse.FromString(reply)
    print(f"\npartial_success: {response.partial_success}")
    assert response.partial_success.rejected_spans == len(traces)
    assert "invalid span id" in response.partial_success.error_message
    await wait_for(lambda: decided(gateways[1:]) == len(traces), timeout=15)
    assert forwarded_spans(gateways[0]) == len(traces) * (SPANS_PER_TRACE - 1)


async def test_traces_a_peer_routed_by_the_same_ring_are_not_looked_up_again(cluster: Cluster) -> None:
    """The sender names the ring it routed by; a member with that ring takes the traces as its own
    without asking the ring about each (here even those it does not own, to show it asks nothing)."""
    traces = make_traces(random.Random(11), 30)
    gateways = await start_members(cluster, 3, static)
    member = gateways[0].cluster
    assert member is not None
    body = request_of([span for spans in traces for span in spans]).SerializeToString()
    forwarder = Forwarder(ForwardConfig())
    try:
        assert forwarder.send_traces(member.member_id, summarize(body), 1, ring=member.ring.digest)
        assert await forwarder.flush(10)
    finally:
        await forwarder.close()
    await wait_for(lambda: decided(gateways[:1]) == len(traces), timeout=15)
    assert forwarded_spans(gateways[0]) == 0
    assert member.ring.digest != Ring(member.ring.members[:2]).digest


async def test_a_leaving_member_routes_everything_on_and_its_peers_keep_it(cluster: Cluster) -> None:
    """A leaving member's ring (the members without it) is the one the others are about to see: what it
    sends is kept where it lands, even by a member that still counts the leaving one in."""
    gateways = await start_members(cluster, 2, static)
    node, other = gateways[0].cluster, gateways[1].cluster
    assert node is not None and other is not None
    rng = random.Random(8)
    trace_ids = [rng.randbytes(16) for _ in range(40)]
    assert node.router(MAX_HOPS) is None
    # As ClusterNode.leave does with a membership that lets the others know.
    node.leaving = True
    node.ring = Ring([other.member_id])
    route = node.router(MAX_HOPS)
    assert route is not None
    assert {route(trace_id) for trace_id in trace_ids} == {other.member_id}
    assert node.router(LEFT) is None  # from another leaving member: kept here
    traces = make_traces(random.Random(9), 20)
    body = request_of([span for spans in traces for span in spans]).SerializeToString()
    node.forward({other.member_id: summarize(body)}, hops=0)
    await wait_for(lambda: other.server.stats.spans == len(traces) * SPANS_PER_TRACE)
    # Kept there although its ring still gives about half of these traces to the leaving member.
    await wait_for(lambda: decided(gateways[1:]) == len(traces), timeout=15)
    assert forwarded_spans(gateways[1]) == 0


async def test_clients_wait_for_a_backlogged_member_and_get_503_once_its_queue_is_full_but_peers_do_not(
    cluster: Cluster,
) -> None:
    """A member that cannot deliver to another (down here) holds its clients' requests a moment, then
    refuses them with 503 and Retry-After once the queue is full; spans its peers forward are taken
    whatever that queue holds, or members forwarding to each other would wait on each other."""
    live, down = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = member_config(cluster.downstream, live, static([live, down]))
    config["cluster"]["forward"].update(max_batch_bytes=1024, queue_bytes=4096)
    gateway = await cluster.start(config)
    node = gateway.cluster
    assert node is not None
    traces = [
        spans for spans in make_traces(random.Random(10), 200) if node.ring.owner(spans[0].trace_id) == down
    ]
    bodies = [request_of(spans).SerializeToString() for spans in traces]
    loop = asyncio.get_running_loop()
    statuses, waits = [], []
    async with aiohttp.ClientSession() as session:
        for body in bodies[:30]:
            started = loop.time()
            async with session.post(
                receiver_url(gateway), data=body, headers={"Content-Type": "application/x-protobuf"}
            ) as reply:
                statuses.append(reply.status)
                waits.append(loop.time() - started)
                retry_after = reply.headers.get("Retry-After")
            if statuses.count(503) == 2:
                break
    print(f"\nstatuses {statuses}, waits {[round(wait, 2) for wait in waits]}")
    assert statuses[0] == 200 and statuses[-2:] == [503, 503]
    assert retry_after is not None
    assert waits[0] < ROOM_WAIT / 2
    # Held for room first: those taken after the wait, and those refused then.
    assert 200 in [status for status, wait in zip(statuses, waits, strict=True) if wait >= ROOM_WAIT * 0.9]
    assert all(wait >= ROOM_WAIT * 0.9 for wait in waits[-2:])
    assert node.forwarder.full(down)
    # The same spans from a peer, as if it had not yet seen the ring: taken and queued on.
    peer = Forwarder(ForwardConfig())
    try:
        queued = node.forwarder.pending(down).spans
        assert peer.send_traces(node.member_id, summarize(bodies[-1]), 1)
        assert await peer.flush(10)
    finally:
        await peer.close()
    assert node.forwarder.pending(down).spans == queued + SPANS_PER_TRACE
    # A handover to a member whose queue is full keeps the traces here, to be decided here.
    # Without their roots, so that they wait the whole decision_wait.
    mine = request_of(
        [span for spans in make_traces(random.Random(13), 10) for span in spans if span.parent_span_id]
    )
    peer = Forwarder(ForwardConfig())
    try:
        assert peer.send_traces(node.member_id, summarize(mine.SerializeToString()), 1, ring=node.ring.digest)
        assert await peer.flush(10)
    finally:
        await peer.close()
    buffered = set(node.buffer.traces)
    assert len(buffered) == 10
    queued = node.forwarder.pending(down).spans
    await node._hand_over(Ring([down]))
    assert set(node.buffer.traces) == buffered
    assert node.forwarder.pending(down).spans == queued
    assert handed_over_traces(gateway) == 0


async def send_each_on_its_own_connection(url: str, requests: list[ExportTraceServiceRequest]) -> None:
    """One connection per request, 8 at a time: with SO_REUSEPORT the kernel spreads them over workers."""
    semaphore = asyncio.Semaphore(8)

    async def one(request: ExportTraceServiceRequest) -> None:
        async with semaphore:
            await send(url, request)  # a new session, so a new connection

    await asyncio.gather(*(one(request) for request in requests))


async def test_two_workers_pass_the_same_end_to_end_test_as_one_process(
    downstream: Downstream, tmp_path: Path
) -> None:
    traces = make_traces(random.Random(3), 150)
    kept = await single_gateway_keeps(traces)
    config = single_config(downstream)
    config["workers"] = 2
    admin = int(config["admin"]["endpoint"].rsplit(":", 1)[1])
    process = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin, process)
        url = f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces"
        # Spans of each trace spread over many requests, each on its own connection.
        requests = [request for batch in requests_round_robin(traces, 12) for request in batch]
        await send_each_on_its_own_connection(url, requests)
        await wait_for(lambda: len(delivered(downstream)) >= len(kept) * SPANS_PER_TRACE, timeout=15)
        text = await scrape_text(admin)
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    forwarded = sum_samples(text, "tailgate_cluster_forwarded_spans_total")
    accepted = sum_samples(
        text, "tailgate_receiver_spans_total", 'protocol="otlp_http"', 'outcome="accepted"'
    )
    print(
        f"\nworkers: 2: {accepted:g} spans accepted over both workers, {forwarded:g} forwarded to the other"
    )
    check_complete("workers: 2", traces, kept, downstream)
    assert process.returncode == 0
    assert forwarded > 0
    assert accepted == len(traces) * SPANS_PER_TRACE
    assert "tailgate_workers_alive 2.0" in text


async def scrape_text(port: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as reply:
        return await reply.text()


def sum_samples(text: str, name: str, *labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        metric_name = line.split("{", 1)[0].split(" ", 1)[0]
        if metric_name == name and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def with_redis(redis: RedisServer, prefix: str) -> Membership:
    def membership(endpoints: list[str]) -> dict[str, Any]:
        return {
            "redis": {"address": redis.address, "key_prefix": prefix, "heartbeat": "0.2s", "timeout": "1.5s"}
        }

    return membership


async def converged(gateways: list[Gateway], members: int, timeout: float = 10) -> None:
    await wait_for(
        lambda: all(metric(gateway, "tailgate_cluster_members") == members for gateway in gateways),
        timeout=timeout,
    )


async def test_three_members_found_through_redis_decide_each_trace_once_and_whole(
    cluster: Cluster, redis: RedisServer
) -> None:
    traces = make_traces(random.Random(4), 120)
    kept = await single_gateway_keeps(traces)
    gateways = await start_members(cluster, 3, with_redis(redis, "three"))
    await converged(gateways, 3)
    await send_all(gateways, requests_round_robin(traces, 3))
    await wait_for(lambda: decided(gateways) == len(traces), timeout=15)
    await wait_for(lambda: len(delivered(cluster.downstream)) == len(kept) * SPANS_PER_TRACE, timeout=10)
    check_complete("3 members through Redis", traces, kept, cluster.downstream)
    assert sum(forwarded_spans(gateway) for gateway in gateways) > len(traces) * SPANS_PER_TRACE / 2


def spans_in_rounds(traces: list[list[Span]]) -> list[list[Span]]:
    """Round k holds span k of every trace: each trace is in flight from the first round to the last."""
    return [[spans[index] for spans in traces] for index in range(SPANS_PER_TRACE)]


async def send_round(gateways: list[Gateway], spans: list[Span]) -> None:
    chunks = [spans[i : i + 20] for i in range(0, len(spans), 20)]
    await asyncio.gather(
        *(
            send(receiver_url(gateways[n % len(gateways)]), request_of(chunk))
            for n, chunk in enumerate(chunks)
        )
    )


async def test_a_member_joining_and_another_leaving_with_traces_in_flight_lose_nothing(
    cluster: Cluster, redis: RedisServer
) -> None:
    traces = make_traces(random.Random(5), 150)
    kept = await single_gateway_keeps(traces)
    membership = with_redis(redis, "churn")
    endpoints = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    configs = [member_config(cluster.downstream, endpoint, membership(endpoints)) for endpoint in endpoints]
    for config in configs:
        # Long enough for every trace to be in flight through both changes.
        config["tail_sampling"].update(decision_wait="6s", decision_wait_after_root_received="6s")
    first, second = await asyncio.gather(cluster.start(configs[0]), cluster.start(configs[1]))
    live = [first, second]
    await converged(live, 2)
    rounds = spans_in_rounds(traces)
    handed_over = 0.0
    for number, spans in enumerate(rounds):
        await send_round(live, spans)
        if number == 1:  # a member joins
            third = await cluster.start(configs[2])
            live.append(third)
            await converged(live, 3)
        if number == 3:  # and the first leaves, as on SIGTERM
            live.remove(first)
            await cluster.stop(first)
            handed_over = handed_over_traces(first)
            await converged(live, 2)
    await wait_for(lambda: decided(live) >= len(traces), timeout=20)
    await wait_for(lambda: len(delivered(cluster.downstream)) >= len(kept) * SPANS_PER_TRACE, timeout=10)
    joined_took = handed_over_traces(second)
    print(f"\nchurn: the leaving member handed over {handed_over:g} traces, the others {joined_took:g}")
    check_complete("a member joins, another leaves", traces, kept, cluster.downstream)
    assert handed_over > 0
    assert joined_took > 0  # to the member that joined


def handed_over_traces(gateway: Gateway) -> float:
    return sum(
        sample.value
        for family in gateway.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "tailgate_cluster_handed_over_traces_total"
    )


async def test_members_keep_serving_with_the_last_membership_while_redis_is_down(
    cluster: Cluster, redis: RedisServer
) -> None:
    traces = make_traces(random.Random(6), 90)
    kept = await single_gateway_keeps(traces)
    gateways = await start_members(cluster, 3, with_redis(redis, "outage"))
    await converged(gateways, 3)
    redis.stop()
    await wait_for(
        lambda: all(metric(g, "tailgate_cluster_membership_connected") == 0 for g in gateways), timeout=10
    )
    await asyncio.sleep(2.0)  # past the member timeout: nobody is dropped for want of heartbeats
    await send_all(gateways, requests_round_robin(traces, 3))
    await wait_for(lambda: decided(gateways) == len(traces), timeout=15)
    await wait_for(lambda: len(delivered(cluster.downstream)) == len(kept) * SPANS_PER_TRACE, timeout=10)
    members = [metric(g, "tailgate_cluster_members") for g in gateways]
    errors = sum(metric(g, "tailgate_cluster_membership_errors_total") for g in gateways)
    redis.start()
    await wait_for(
        lambda: all(metric(g, "tailgate_cluster_membership_connected") == 1 for g in gateways), timeout=10
    )
    print(f"\nRedis down: members seen {members}, {errors:g} failed Redis operations")
    check_complete("Redis down", traces, kept, cluster.downstream)
    assert members == [3, 3, 3]
    assert errors > 0


async def scrape_value(port: int, name: str) -> float:
    return sum_samples(await scrape_text(port), name)


async def wait_scraped(ports: list[int], name: str, value: float, timeout: float) -> float:
    """Seconds until every gateway reports `name` == `value`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        values = [await scrape_value(port, name) for port in ports]
        if all(found == value for found in values):
            return loop.time() - started
        assert loop.time() - started < timeout, f"{name} = {values}, not {value}, after {timeout}s"
        await asyncio.sleep(0.05)


async def test_a_member_killed_loses_only_the_traces_it_owned_and_the_cluster_converges(
    downstream: Downstream, redis: RedisServer, tmp_path: Path
) -> None:
    before = make_traces(random.Random(7), 150)
    after = make_traces(random.Random(8), 60)
    kept = await single_gateway_keeps(before + after)
    endpoints = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    timeout = 1.5
    configs = [
        member_config(downstream, endpoint, with_redis(redis, "kill")(endpoints)) for endpoint in endpoints
    ]
    for config in configs:
        config["tail_sampling"].update(decision_wait="30s", decision_wait_after_root_received="30s")
    admins = [int(config["admin"]["endpoint"].rsplit(":", 1)[1]) for config in configs]
    urls = [f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces" for config in configs]
    processes = [run_gateway(config, tmp_path / f"member{n}.yaml") for n, config in enumerate(configs)]
    try:
        for admin, process in zip(admins, processes, strict=True):
            await wait_ready(admin, process)
        await wait_scraped(admins, "tailgate_cluster_members", 3, timeout=10)
        for url, batch in zip(urls, requests_round_robin(before, 3), strict=True):
            for request in batch:
                await send(url, request)
        # Every span with its owner: nothing left in the forward queues.
        await wait_scraped(admins, "tailgate_cluster_forward_queue_spans", 0, timeout=10)
        victim = 1
        owners = Ring(endpoints)
        at_risk = {
            spans[0].trace_id for spans in before if owners.owner(spans[0].trace_id) == endpoints[victim]
        }
        processes[victim].kill()
        await asyncio.to_thread(processes[victim].wait, 10)
        survivors = [n for n in range(3) if n != victim]
        converged_after = await wait_scraped(
            [admins[n] for n in survivors], "tailgate_cluster_members", 2, timeout=timeout + 5
        )
        for n, request in enumerate(request for batch in requests_round_robin(after, 2) for request in batch):
            await send(urls[survivors[n % 2]], request)
        for n in survivors:  # a rolling stop: the first hands its traces to the last, which decides them
            processes[n].send_signal(signal.SIGTERM)
            await asyncio.to_thread(processes[n].wait, 30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    counts = delivered(downstream)
    arrived = {trace_id for trace_id, _ in counts}
    lost_traces = {trace_id for trace_id in kept if trace_id not in arrived}
    kept_at_risk = kept & at_risk
    print(
        f"\nkill -9 of one of 3 members: it owned {len(at_risk)} of {len(before)} buffered traces "
        f"({len(kept_at_risk)} of them would be kept); lost {len(lost_traces)} kept traces; "
        f"the others saw it leave after {converged_after:.2f}s (member timeout {timeout}s)"
    )
    assert lost_traces <= kept_at_risk  # only what it owned and buffered
    unaffected = [spans for spans in before + after if spans[0].trace_id not in at_risk]
    check_complete("the members left", unaffected, kept - at_risk, downstream_without(downstream, at_risk))
    assert converged_after < timeout + 1.0
    assert all(processes[n].returncode == 0 for n in survivors)


def downstream_without(downstream: Downstream, traces: set[bytes]) -> Downstream:
    """A copy of what `downstream` received, without the spans of `traces`."""
    copy = Downstream()
    for request in downstream.requests:
        kept = ExportTraceServiceRequest()
        kept.CopyFrom(request)
        for rs in kept.resource_spans:
            for ss in rs.scope_spans:
                spans = [span for span in ss.spans if span.trace_id not in traces]
                del ss.spans[:]
                ss.spans.extend(spans)
        copy.requests.append(kept)
    return copy


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


async def test_workers_stop_when_their_supervisor_is_killed(downstream: Downstream, tmp_path: Path) -> None:
    config = single_config(downstream)
    config["workers"] = 2
    admin = int(config["admin"]["endpoint"].rsplit(":", 1)[1])
    process = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin, process)
        workers = children_of(process.pid)
        assert len(workers) == 2
        process.kill()
        await asyncio.to_thread(process.wait, 10)
        await wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), timeout=10)
    finally:
        if process.poll() is None:
            process.kill()


async def test_a_late_span_of_a_trace_decided_before_a_member_joined_follows_the_decision(
    cluster: Cluster, downstream: Downstream
) -> None:
    """A member decided trace T (kept: an error) while alone; J joins and owns T now. A late span of T
    reaching the first member while it hands its decisions over (a busy decision cache takes a while)
    is exported as a late span of the kept trace; it is not sent to J ahead of T's decision, where it
    would start T again and have it decided a second time (without the error: dropped)."""
    first_id, joined_id = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    configs = [
        member_config(downstream, first_id, {"peers": [first_id]}),
        member_config(downstream, joined_id, {"peers": [first_id, joined_id]}),
    ]
    for config in configs:
        config["tail_sampling"]["policies"] = [
            {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}
        ]
    first, joined = await cluster.start(configs[0]), await cluster.start(configs[1])
    node = first.cluster
    assert node is not None
    ring = Ring([first_id, joined_id])
    rng = random.Random(21)
    while ring.owner(trace_id := rng.randbytes(16)) != joined_id:
        pass
    root = Span(
        trace_id=trace_id, span_id=rng.randbytes(8), name="root", start_time_unix_nano=1, end_time_unix_nano=2
    )
    root.status.code = Status.STATUS_CODE_ERROR
    await send(receiver_url(first), request_of([root]))
    await wait_for(lambda: decided([first]) == 1 and len(delivered(downstream)) == 1)
    for _ in range(100_000):  # a full decision cache of dropped traces (the default size)
        first.decisions.record(rng.randbytes(16), None)
    late = Span(
        trace_id=trace_id,
        span_id=rng.randbytes(8),
        parent_span_id=root.span_id,
        name="late",
        start_time_unix_nano=3,
        end_time_unix_nano=4,
    )
    node._members_changed((first_id, joined_id))  # as Redis would report the join
    await asyncio.sleep(0)  # the new ring is in place, the handover under way
    assert node.ring == ring
    await send(receiver_url(first), request_of([late]))
    await wait_for(lambda: node.forwarder.peer_stats(joined_id).decisions > 40_000)
    await wait_for(lambda: not node.forwarder.pending(joined_id).messages)
    await asyncio.sleep(1.5)  # past the joined member's decision_wait for anything it buffered
    assert decided([joined]) == 0  # T was decided once, by the first member
    assert len(delivered(downstream)) == 2  # and its late span followed the decision


async def test_a_member_leaving_while_redis_does_not_answer_stops_and_flushes_within_shutdown_timeout(
    downstream: Downstream, tmp_path: Path
) -> None:
    """`shutdown_timeout` bounds the whole shutdown: a Redis that accepts connections and answers nothing
    (a partition, a paused server) takes a share of it, not `redis.timeout` more, and what is buffered is
    still decided and exported within it."""
    with RedisServer(tmp_path / "redis") as redis:
        config = gateway_config(
            downstream,
            policies=[{"name": "all", "type": "always_sample"}],
            decision_wait="60s",
            decision_wait_after_root_received="60s",
        )
        config["shutdown_timeout"] = "0.5s"
        config["cluster"] = {
            "endpoint": f"127.0.0.1:{free_port()}",
            "redis": {"address": redis.address, "heartbeat": "0.2s", "timeout": "4s", "key_prefix": "slow"},
        }
        gateway = Gateway(parse_config(config))
        await gateway.start()
        await send(receiver_url(gateway), make_request(20, 3))
        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await gateway.stop()
            took = time.monotonic() - started
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
    assert took < 3.0  # 4 s before: redis.timeout on top
    assert len(downstream.spans()) == 60


async def test_a_member_with_a_short_shutdown_timeout_still_leaves_redis_at_once(
    cluster: Cluster, redis: RedisServer
) -> None:
    membership = {
        "redis": {"address": redis.address, "key_prefix": "short", "timeout": "30s", "heartbeat": "0.2s"}
    }
    staying = await cluster.start(member_config(cluster.downstream, f"127.0.0.1:{free_port()}", membership))
    leaving_config = member_config(cluster.downstream, f"127.0.0.1:{free_port()}", membership)
    leaving_config["shutdown_timeout"] = "0s"
    leaving = await cluster.start(leaving_config)
    await wait_for(lambda: metric(staying, "tailgate_cluster_members") == 2)
    await leaving.stop()
    await wait_for(lambda: metric(staying, "tailgate_cluster_members") == 1, timeout=3)  # not after 30 s
