"""Cluster membership: the static list, and members that find each other through a real redis-server, leave,
crash, ride out a Redis outage and restart, authenticate, and keep clusters apart by key prefix."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from sampler.cluster.membership import RedisMembership, StaticMembership, build_membership
from sampler.config import ClusterConfig, RedisMembershipConfig
from sampler.errors import ConfigError
from tests.cluster.redis_server import RedisServer
from tests.conftest import free_port

HEARTBEAT = 0.2
PASSWORD = "s3cret-Pa55word"


async def eventually(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Wait until `condition()` holds, failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.02)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


MemberFactory = Callable[..., Awaitable[RedisMembership]]


@pytest.fixture
async def start_member(redis_server: RedisServer) -> AsyncIterator[MemberFactory]:
    """Starts RedisMemberships (on `redis_server` unless told otherwise) and stops them after the test."""
    started: list[RedisMembership] = []

    async def start(member_id: str, **config: object) -> RedisMembership:
        settings: dict[str, object] = {
            "address": redis_server.address,
            "heartbeat": HEARTBEAT,
            "timeout": 1.0,
            "key_prefix": "test",
        }
        settings.update(config)
        member = RedisMembership(RedisMembershipConfig.model_validate(settings), member_id)
        await member.start()
        started.append(member)
        return member

    yield start
    for member in started:
        await member.stop()


async def member_keys(address: str, pattern: str = "test:member:*", **options: object) -> set[str]:
    host, port = address.rsplit(":", 1)
    client = Redis(host=host, port=int(port), decode_responses=True, **options)
    try:
        return {key async for key in client.scan_iter(match=pattern)}
    finally:
        await client.aclose()


def all_see(members: list[RedisMembership], expected: list[str]) -> Callable[[], bool]:
    wanted = tuple(sorted(expected))
    return lambda: all(member.members == wanted for member in members)


# --- static ---


def test_static_members_are_sorted_and_must_include_this_member() -> None:
    membership = StaticMembership(["10.0.0.2:4319", "10.0.0.1:4319", "10.0.0.2:4319"], "10.0.0.1:4319")
    assert membership.members == ("10.0.0.1:4319", "10.0.0.2:4319")
    with pytest.raises(ConfigError, match=r"cluster\.peers: must include this member's id '10.0.0.3:4319'"):
        StaticMembership(["10.0.0.1:4319", "10.0.0.2:4319"], "10.0.0.3:4319")


async def test_static_membership_never_changes() -> None:
    cluster = ClusterConfig(endpoint="127.0.0.1:4319", peers=["127.0.0.1:4320", "127.0.0.1:4319"])
    membership = build_membership(cluster)
    assert isinstance(membership, StaticMembership)
    seen: list[tuple[str, ...]] = []
    membership.subscribe(seen.append)
    await membership.start()
    await membership.stop()
    assert membership.members == ("127.0.0.1:4319", "127.0.0.1:4320")
    assert seen == []


def test_build_membership_picks_redis_when_configured() -> None:
    cluster = ClusterConfig.model_validate(
        {"endpoint": "127.0.0.1:4319", "advertise": "10.1.2.3:4319", "redis": {"address": "127.0.0.1:1"}}
    )
    membership = build_membership(cluster)
    assert isinstance(membership, RedisMembership)
    assert membership.member_id == "10.1.2.3:4319"
    assert membership.members == ("10.1.2.3:4319",)


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "127.0.0.1:70000", "http://127.0.0.1:6379"])
def test_an_unusable_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match=r"^cluster\.redis\.address: "):
        RedisMembership(RedisMembershipConfig(address=address), "a:1")


# --- Redis ---


async def test_members_see_each_other_and_report_changes(start_member: MemberFactory) -> None:
    ids = ["127.0.0.1:4319", "10.0.0.2:4319", "unix:/run/tailgate/c.sock"]
    first = await start_member(ids[0])
    assert first.members == (ids[0],)
    assert first.connected
    seen: list[tuple[str, ...]] = []
    first.subscribe(seen.append)
    second = await start_member(ids[1])
    # start() returns with a view read from Redis: the member already there is in it.
    assert second.members == tuple(sorted(ids[:2]))
    third = await start_member(ids[2])
    members = [first, second, third]
    await eventually(all_see(members, ids), what="all three see each other")
    assert all(member.connected and member.errors == 0 for member in members)
    # Callbacks get each new view, sorted, once per change.
    assert seen == [tuple(sorted(ids[:2])), tuple(sorted(ids))]
    assert first.changes == 2


async def test_a_member_that_stops_is_gone_at_once(
    start_member: MemberFactory, redis_server: RedisServer
) -> None:
    # A long timeout: the others must learn of the leave from its message, not from an expired key.
    members = [await start_member(f"10.0.0.{n}:4319", timeout=10.0) for n in (1, 2, 3)]
    await eventually(all_see(members, ["10.0.0.1:4319", "10.0.0.2:4319", "10.0.0.3:4319"]))
    await members[2].stop()
    await eventually(all_see(members[:2], ["10.0.0.1:4319", "10.0.0.2:4319"]), timeout=3.0, what="leave seen")
    assert await member_keys(redis_server.address) == {
        "test:member:10.0.0.1:4319",
        "test:member:10.0.0.2:4319",
    }


async def test_a_crashed_member_is_dropped_when_its_key_expires(start_member: MemberFactory) -> None:
    members = [await start_member(f"10.0.0.{n}:4319") for n in (1, 2, 3)]
    everyone = ["10.0.0.1:4319", "10.0.0.2:4319", "10.0.0.3:4319"]
    await eventually(all_see(members, everyone))
    await members[2].abandon()
    # Its key lives on for up to `timeout` (1 s): the others still count it for now.
    assert all_see(members[:2], everyone)()
    await eventually(all_see(members[:2], everyone[:2]), what="crashed member dropped")
    assert [member.changes for member in members[:2]] == [3, 2]


async def test_members_ride_out_a_redis_outage_and_register_again(
    start_member: MemberFactory, redis_server: RedisServer
) -> None:
    everyone = ["10.0.0.1:4319", "10.0.0.2:4319", "10.0.0.3:4319"]
    members = [await start_member(member_id, timeout=2.0) for member_id in everyone]
    await eventually(all_see(members, everyone))
    changes = [member.changes for member in members]

    redis_server.kill()
    await eventually(lambda: not any(member.connected for member in members), what="outage noticed")
    errors = [member.errors for member in members]
    await eventually(
        lambda: all(member.errors >= count + 3 for member, count in zip(members, errors, strict=True)),
        what="failed operations counted",
    )
    assert all_see(members, everyone)()

    # Restarted empty, on the same port: every member registers again, and none is lost meanwhile.
    redis_server.start()
    await eventually(lambda: all(member.connected for member in members), what="reconnected")
    expected_keys = {f"test:member:{member_id}" for member_id in everyone}
    deadline = time.monotonic() + 5.0
    while await member_keys(redis_server.address) != expected_keys:
        assert time.monotonic() < deadline, "members did not register again"
        await asyncio.sleep(0.05)
    # Past the grace period after reconnecting, the view is read from Redis alone.
    await asyncio.sleep(2.0 + 2 * HEARTBEAT)
    assert all_see(members, everyone)()
    assert [member.changes for member in members] == changes

    # Membership works as before: a newcomer is seen by all.
    newcomer = await start_member("10.0.0.4:4319", timeout=2.0)
    await eventually(all_see([*members, newcomer], [*everyone, "10.0.0.4:4319"]))


async def test_redis_unreachable_at_start(
    start_member: MemberFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    started = time.monotonic()
    member = await start_member("10.0.0.1:4319", address=f"127.0.0.1:{port}")
    # start() gave up after `timeout` and runs alone.
    assert time.monotonic() - started >= 1.0
    assert member.members == ("10.0.0.1:4319",)
    assert not member.connected
    assert member.errors > 0
    assert any(
        "unreachable" in record.getMessage() and record.levelno == logging.WARNING
        for record in caplog.records
    )

    with RedisServer(tmp_path / "late", port=port) as server:
        await eventually(lambda: member.connected, what="joined once Redis is up")
        assert await member_keys(server.address) == {"test:member:10.0.0.1:4319"}
        other = await start_member("10.0.0.2:4319", address=server.address)
        await eventually(all_see([member, other], ["10.0.0.1:4319", "10.0.0.2:4319"]))
        await other.stop()
        await member.stop()


async def test_password_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        good = RedisMembership(
            RedisMembershipConfig(
                address=server.address, password=PASSWORD, heartbeat=HEARTBEAT, timeout=1.0
            ),
            "10.0.0.1:4319",
        )
        wrong = RedisMembership(
            RedisMembershipConfig(
                address=server.address, password="wrong-Pa55word", heartbeat=HEARTBEAT, timeout=1.0
            ),
            "10.0.0.2:4319",
        )
        missing = RedisMembership(
            RedisMembershipConfig(address=server.address, heartbeat=HEARTBEAT, timeout=1.0), "10.0.0.3:4319"
        )
        await good.start()
        await wrong.start()
        await missing.start()
        try:
            assert good.connected
            assert not wrong.connected
            assert not missing.connected
            # The refused members run alone, and are not in Redis.
            assert wrong.members == ("10.0.0.2:4319",)
            await asyncio.sleep(3 * HEARTBEAT)
            assert good.members == ("10.0.0.1:4319",)
            assert wrong.errors > 1
        finally:
            for member in (good, wrong, missing):
                await member.stop()
    refusals = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(refusals) == 2
    for record in refusals:
        assert "authentication failed" in record.getMessage()
        assert "cluster.redis.password" in record.getMessage()
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert PASSWORD not in text
        assert "wrong-Pa55word" not in text


async def test_url_addresses_with_credentials_db_and_unix_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with RedisServer(tmp_path / "redis", password=PASSWORD) as server:
        over_tcp = RedisMembership(
            RedisMembershipConfig(
                address=f"redis://:{PASSWORD}@127.0.0.1:{server.port}/2", heartbeat=HEARTBEAT, timeout=1.0
            ),
            "10.0.0.1:4319",
        )
        over_unix = RedisMembership(
            RedisMembershipConfig(
                address=f"unix://{server.unix_socket}?db=2",
                password=PASSWORD,
                heartbeat=HEARTBEAT,
                timeout=1.0,
            ),
            "10.0.0.2:4319",
        )
        await over_tcp.start()
        await over_unix.start()
        try:
            await eventually(all_see([over_tcp, over_unix], ["10.0.0.1:4319", "10.0.0.2:4319"]))
            assert await member_keys(server.address, "tailgate:member:*", password=PASSWORD, db=2) == {
                "tailgate:member:10.0.0.1:4319",
                "tailgate:member:10.0.0.2:4319",
            }
            assert await member_keys(server.address, "*", password=PASSWORD, db=0) == set()
        finally:
            await over_tcp.stop()
            await over_unix.stop()
    assert any(f"redis://127.0.0.1:{server.port}/2" in record.getMessage() for record in caplog.records)
    assert all(PASSWORD not in record.getMessage() for record in caplog.records)


async def test_key_prefix_keeps_clusters_apart(start_member: MemberFactory) -> None:
    # A prefix with glob characters must still match only its own keys.
    blue = [await start_member(f"10.0.0.{n}:4319", key_prefix="blue") for n in (1, 2)]
    green = [await start_member(f"10.0.0.{n}:4319", key_prefix="blue*") for n in (3, 4)]
    await eventually(all_see(blue, ["10.0.0.1:4319", "10.0.0.2:4319"]))
    await eventually(all_see(green, ["10.0.0.3:4319", "10.0.0.4:4319"]))
    await green[1].stop()
    await eventually(all_see(green[:1], ["10.0.0.3:4319"]))
    await asyncio.sleep(2 * HEARTBEAT)
    assert all_see(blue, ["10.0.0.1:4319", "10.0.0.2:4319"])()
    assert all(member.changes == 0 for member in blue[1:])


async def test_a_failing_callback_does_not_stop_updates(start_member: MemberFactory) -> None:
    first = await start_member("10.0.0.1:4319")
    seen: list[tuple[str, ...]] = []

    def broken(members: tuple[str, ...]) -> None:
        raise RuntimeError("callback bug")

    first.subscribe(broken)
    first.subscribe(seen.append)
    second = await start_member("10.0.0.2:4319")
    await eventually(lambda: len(seen) == 1)
    await second.stop()
    await eventually(lambda: len(seen) == 2)
    assert seen == [("10.0.0.1:4319", "10.0.0.2:4319"), ("10.0.0.1:4319",)]


IDS = ["10.0.0.1:4319", "10.0.0.2:4319", "10.0.0.3:4319"]


async def reset_pubsub_connections(admin: Redis, period: float) -> None:
    """Reset every pub/sub connection every `period` seconds, as a proxy or load balancer with an idle
    timeout in front of Redis does (a quiet cluster's pub/sub connections are its only idle ones)."""
    while True:
        await asyncio.sleep(period)
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


@pytest.mark.parametrize("how", ["subscribe_refused", "pubsub_connections_reset"])
async def test_a_crashed_member_is_dropped_while_only_pubsub_fails(
    redis_server: RedisServer, start_member: MemberFactory, how: str
) -> None:
    """Redis answers every command but pub/sub fails: the wake-ups are lost, not the heartbeat's reads,
    so a crashed member's key expires and the others drop it (a pub/sub failure taken for Redis being
    away started a grace period after each failure, which kept it in every ring)."""
    admin = Redis(host="127.0.0.1", port=redis_server.port)
    options: dict[str, object] = {}
    if how == "subscribe_refused":
        # Every command a member uses works (SET, PUBLISH, SCAN, DEL) but SUBSCRIBE.
        await admin.execute_command("ACL", "SETUSER", "tg", "on", ">pw", "~*", "&*", "+@all", "-subscribe")
        options = {"username": "tg", "password": "pw"}
    resetting = None
    try:
        members = [await start_member(member_id, **options) for member_id in IDS]
        await eventually(all_see(members, IDS), what="all three see each other")
        if how == "pubsub_connections_reset":
            resetting = asyncio.create_task(reset_pubsub_connections(admin, 0.5))
        await members[2].abandon()  # kill -9: its key expires after `timeout` (1 s)
        await eventually(all_see(members[:2], IDS[:2]), timeout=6.0, what="the crashed member dropped")
        assert all(member.connected for member in members[:2])
    finally:
        if resetting is not None:
            resetting.cancel()
        await admin.aclose()


class BlackHoleProxy:
    """A TCP proxy to Redis that can drop what a pub/sub connection sends and receives, closing nothing,
    as a NAT or a load balancer that forgot the connection does; it notes when members read the keys."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.pubsub: list[dict[str, bool]] = []
        self.reads: list[float] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.close()

    def drop_pubsub(self) -> int:
        for state in self.pubsub:
            state["dropped"] = True
        return len(self.pubsub)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.writers += [client_writer, server_writer]
        state = {"dropped": False}
        loop = asyncio.get_running_loop()

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: bool) -> None:
            while data := await reader.read(65536):
                if upstream and b"SUBSCRIBE" in data and state not in self.pubsub:
                    self.pubsub.append(state)
                if state["dropped"]:
                    continue
                if upstream and b"SCAN" in data:
                    self.reads.append(loop.time())
                writer.write(data)
                await writer.drain()
            writer.close()

        for task in (
            asyncio.create_task(pump(client_reader, server_writer, True)),
            asyncio.create_task(pump(server_reader, client_writer, False)),
        ):
            self.tasks.add(task)


async def test_a_pubsub_connection_gone_silent_is_replaced(
    redis_server: RedisServer, start_member: MemberFactory
) -> None:
    """A member's pub/sub connection is dropped on the way without being closed (its command connection
    works): pinged while quiet and unanswered for `timeout`, it is replaced, and a leave is again seen at
    once rather than at the member's next heartbeat."""
    heartbeat, timeout = 1.0, 1.5
    proxy = BlackHoleProxy(redis_server.port)
    proxy_port = await proxy.start()
    try:
        watched = await start_member(
            IDS[0], address=f"127.0.0.1:{proxy_port}", heartbeat=heartbeat, timeout=timeout
        )
        others = [
            await start_member(member_id, heartbeat=heartbeat, timeout=timeout) for member_id in IDS[1:]
        ]
        await eventually(all_see([watched, *others], IDS), timeout=3 * heartbeat, what="all see each other")
        assert proxy.drop_pubsub() == 1
        await asyncio.sleep(4 * timeout)  # time to notice and subscribe again
        # Right after the watched member's heartbeat read, so that only pub/sub can tell it sooner.
        reads = len(proxy.reads)
        await eventually(lambda: len(proxy.reads) > reads, timeout=2 * heartbeat, what="a heartbeat read")
        left_at = time.monotonic()
        await others[1].stop()
        await eventually(lambda: watched.members == tuple(sorted(IDS[:2])), timeout=2 * heartbeat)
        seen_after = time.monotonic() - left_at
        assert seen_after < heartbeat / 2, f"the leave was seen {seen_after:.2f}s later, at a heartbeat read"
        assert len(proxy.pubsub) == 2  # subscribed again, on a new connection
    finally:
        await proxy.stop()


async def test_member_keys_lost_while_redis_answers_drop_no_live_member(
    redis_server: RedisServer, start_member: MemberFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis loses every member key while every connection stays up (FLUSHDB on a shared Redis, eviction
    under a volatile-* maxmemory-policy, which picks short-lived keys first): each member finds its own key
    gone, registers again and keeps the members it knew for `timeout`, as after Redis restarted empty;
    none is dropped and added back (which would hand traces over twice)."""
    members = [await start_member(member_id) for member_id in IDS]
    await eventually(all_see(members, IDS), what="all three see each other")
    views: list[tuple[str, ...]] = []
    for member in members:
        member.subscribe(views.append)
    admin = Redis(host="127.0.0.1", port=redis_server.port)
    try:
        await admin.flushdb()
    finally:
        await admin.aclose()
    await asyncio.sleep(1.0 + 3 * HEARTBEAT)
    assert all_see(members, IDS)()
    assert views == [], f"live members dropped and added back: {views}"
    assert await member_keys(redis_server.address) == {f"test:member:{member_id}" for member_id in IDS}
    assert "lost this member's key" in caplog.text


async def lose_member_keys(redis_server: RedisServer, period: float) -> None:
    """Every `period` seconds, delete every member key, as a Redis under steady memory pressure with a
    volatile-* maxmemory-policy evicts its shortest-lived keys."""
    admin = Redis(host="127.0.0.1", port=redis_server.port)
    try:
        while True:
            await asyncio.sleep(period)
            keys = [key async for key in admin.scan_iter(match="test:member:*")]
            if keys:
                await admin.delete(*keys)
    finally:
        await admin.aclose()


async def test_a_crashed_member_is_dropped_while_redis_keeps_losing_keys(
    redis_server: RedisServer, start_member: MemberFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Live members' keys are lost every 0.5 s (timeout 1 s) and registered again; the crashed member's
    key is gone for good. Holding the members on each loss kept it in every ring for ever; it is dropped
    once not seen for `timeout`. The warning of a lost key goes out once per throttle period, not at
    every heartbeat."""
    members = [await start_member(member_id) for member_id in IDS]
    await eventually(all_see(members, IDS), what="all three see each other")
    await members[2].abandon()  # kill -9
    losing = asyncio.create_task(lose_member_keys(redis_server, 0.5))
    try:
        await eventually(all_see(members[:2], IDS[:2]), timeout=8.0, what="the crashed member dropped")
        await asyncio.sleep(2.0)
        assert all_see(members[:2], IDS[:2])()  # and the live ones stay
    finally:
        losing.cancel()
    warnings = [record for record in caplog.records if "lost this member's key" in record.getMessage()]
    assert 1 <= len(warnings) <= 2 * 2  # two members, each throttled (one per 5 s)
