"""Who is in the cluster: a static list from the config, or members that announce themselves in Redis with
heartbeat keys that expire, and pub/sub messages so joins and leaves are seen at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from sampler.config import ClusterConfig, RedisMembershipConfig
from sampler.errors import ConfigError
from sampler.logthrottle import LogThrottle

log = logging.getLogger(__name__)

MembersCallback = Callable[[tuple[str, ...]], None]

DEFAULT_REDIS_PORT = 6379
# Keys asked for per SCAN call: a cluster has few members, so one call usually reads them all.
SCAN_COUNT = 1000
# How long stopping waits for a background task before cancelling it again.
CANCEL_RETRY_INTERVAL = 0.05


class Membership(Protocol):
    """The current members of the cluster, each by its id (the address peers reach it at)."""

    # Sorted; the same on every member once the cluster has settled.
    members: tuple[str, ...]

    def subscribe(self, callback: MembersCallback) -> None:
        """Call `callback` with the new members, on the event loop, after each change once started."""

    async def start(self) -> None:
        """Join the cluster; `members` holds the first view when this returns."""

    async def stop(self) -> None:
        """Leave the cluster so that the others see it at once, not after a timeout."""


class StaticMembership:
    """Members listed in the config (`cluster.peers`); the list never changes while running."""

    def __init__(self, peers: Iterable[str], member_id: str | None = None) -> None:
        self.members: tuple[str, ...] = tuple(sorted(set(peers)))
        if not self.members:
            raise ConfigError("cluster.peers: must list at least this member")
        # A member missing from its own list would compute owners over a different set than its peers.
        if member_id is not None and member_id not in self.members:
            raise ConfigError(
                f"cluster.peers: must include this member's id {member_id!r} "
                "(cluster.advertise, or cluster.endpoint when it is not set)"
            )

    def subscribe(self, callback: MembersCallback) -> None:
        """Nothing to report: a static list never changes."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def build_membership(cluster: ClusterConfig) -> Membership:
    """The membership `cluster` configures: Redis when `cluster.redis` is set, else the static peers."""
    if cluster.redis is not None:
        return RedisMembership(cluster.redis, cluster.member_id)
    return StaticMembership(cluster.peers, cluster.member_id)


class RedisMembership:
    """Members that renew a key `{key_prefix}:member:{member_id}` with a TTL of `timeout` every `heartbeat`.

    Each member reads the member keys (SCAN) every heartbeat and whenever a member publishes a join or a
    leave on `{key_prefix}:members`. A member that leaves deletes its key and publishes; one that crashes
    disappears when its key expires. While Redis cannot be reached the last known members are kept, failed
    operations are counted in `errors`, and the member registers again as soon as Redis is back.
    """

    def __init__(self, config: RedisMembershipConfig, member_id: str) -> None:
        self.config = config
        self.member_id = member_id
        self.members: tuple[str, ...] = (member_id,)
        # Whether the last Redis operation succeeded.
        self.connected = False
        # Redis operations that failed so far.
        self.errors = 0
        # Changes of `members` seen after start.
        self.changes = 0
        self._key_prefix = f"{config.key_prefix}:member:"
        self._key = self._key_prefix + member_id
        self._match = _glob_escape(self._key_prefix) + "*"
        self._channel = f"{config.key_prefix}:members"
        self._ttl_ms = max(1, round(config.timeout * 1000))
        self._address = _display_address(config.address)
        self._connect_options, self._secrets = _connect_options(config)
        self._client: Redis | None = None
        self._callbacks: list[MembersCallback] = []
        self._wake = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._starting = False
        self._running = False
        # After Redis comes back, or lost this member's key while it answered (flushed, evicted, failed
        # over), members missing from it are kept until then (loop time): Redis is without their keys
        # until each member's next heartbeat, and the view should not flap meanwhile. Each is kept only
        # while it was seen within `timeout` (loop time of the last read that found it, or of the
        # reconnection), so that a member that died meanwhile is dropped however long the hold goes on.
        self._hold_until = 0.0
        self._last_seen: dict[str, float] = {}
        self._last_error = ""
        self._last_error_is_auth = False
        self._log = LogThrottle()

    def subscribe(self, callback: MembersCallback) -> None:
        self._callbacks.append(callback)

    async def start(self) -> None:
        """Register and read the members. Waits at most `timeout` for Redis; if it cannot be reached, starts
        with only this member and joins the others once Redis is back."""
        self._client = self._connect()
        self.members = (self.member_id,)
        self._starting = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout
        try:
            while (remaining := deadline - loop.time()) > 0:
                try:
                    # wait_for, not asyncio.timeout: the attempt runs in a task of its own, so a
                    # cancellation lost inside redis-py (see _cancel_tasks) cannot leak into the caller's.
                    if await asyncio.wait_for(self._sync(renew=True), remaining):
                        break
                except TimeoutError:
                    break
                if self._last_error_is_auth:
                    break
                await asyncio.sleep(min(self.config.heartbeat, 0.1, max(0.0, deadline - loop.time())))
        finally:
            self._starting = False
        if self.connected:
            log.info(
                "cluster membership: joined as %s through Redis at %s; members: %s",
                self.member_id,
                self._address,
                ", ".join(self.members),
            )
        elif self._last_error_is_auth:
            log.error(
                "cluster membership: Redis at %s refused this member's credentials: %s; "
                "running with only this member (%s) and retrying every %gs",
                self._address,
                self._last_error,
                self.member_id,
                self.config.heartbeat,
            )
        else:
            log.warning(
                "cluster membership: Redis at %s unreachable for %gs (%s); running with only this member "
                "(%s) until it is back",
                self._address,
                self.config.timeout,
                self._last_error or "no answer",
                self.member_id,
            )
        self._running = True
        self._sync_task = asyncio.create_task(self._sync_loop(), name="redis membership")
        self._listen_task = asyncio.create_task(self._listen_loop(), name="redis membership changes")

    async def stop(self) -> None:
        """Delete this member's key and tell the others, then stop. Bounded by `timeout`."""
        await self._cancel_tasks()
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.wait_for(self._leave(client), self.config.timeout)
        except (RedisError, OSError) as error:
            self._failed("leaving", error, warn=False)
            log.warning(
                "cluster membership: could not leave through Redis at %s (%s); the others drop %s after %gs",
                self._address,
                self._last_error,
                self.member_id,
                self.config.timeout,
            )
        finally:
            await client.aclose()

    async def _leave(self, client: Redis) -> None:
        await client.delete(self._key)
        await client.publish(self._channel, f"leave {self.member_id}")

    async def abandon(self) -> None:
        """Stop without leaving, as a crashed member would: the others drop it only when its key expires.

        For tests of crash handling."""
        await self._cancel_tasks()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _cancel_tasks(self) -> None:
        """Stop the background tasks, asking again while one is still running: on Python 3.11 a
        cancellation that arrives as redis-py's asyncio.wait_for around a socket write completes is lost."""
        self._running = False
        pending = {task for task in (self._sync_task, self._listen_task) if task is not None}
        self._sync_task = self._listen_task = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_INTERVAL)
        if pending:
            log.warning("cluster membership: %d background tasks did not stop", len(pending))

    def _connect(self) -> Redis:
        address = self.config.address
        if "://" in address:
            return Redis.from_url(address, **self._connect_options)
        host, port = _host_port(address)
        return Redis(host=host, port=port, **self._connect_options)

    async def _sync_loop(self) -> None:
        """Renew the key every heartbeat and read the members then and whenever woken by a message."""
        loop = asyncio.get_running_loop()
        next_renewal = loop.time() + self.config.heartbeat
        while self._running:
            delay = next_renewal - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
            # Cleared before reading, so a message arriving during the read causes another one.
            self._wake.clear()
            renew = loop.time() >= next_renewal
            if renew:
                next_renewal = loop.time() + self.config.heartbeat
            was_connected = self.connected
            if await self._sync(renew) and not was_connected:
                log.info("cluster membership: Redis at %s is reachable again", self._address)

    async def _sync(self, renew: bool) -> bool:
        """Renew this member's key (always after a failure: Redis may have restarted empty), announce a
        (re)join, then read the members. False when Redis failed."""
        client = self._client
        assert client is not None
        announce = not self.connected
        # Whether this member's key was gone although it renewed it in time: Redis lost keys while it
        # answered, the others' too, until their next heartbeat.
        lost = False
        try:
            if announce:
                await client.set(self._key, self.member_id, px=self._ttl_ms)
                await client.publish(self._channel, f"join {self.member_id}")
            elif renew and not await client.set(self._key, self.member_id, px=self._ttl_ms, xx=True):
                lost = True
            found = await self._read_members(client)
            if self.member_id not in found:
                lost = True
            if lost:
                await client.set(self._key, self.member_id, px=self._ttl_ms)
        except (RedisError, OSError) as error:
            self._failed("renewing and reading the members" if renew else "reading the members", error)
            return False
        now = asyncio.get_running_loop().time()
        if (announce or lost) and not self._starting:
            self._hold_until = now + self.config.timeout
            if announce:  # what happened while Redis was away is not known: each gets `timeout` from now
                self._last_seen.update(dict.fromkeys(self.members, now))
        if lost and not announce and not self._starting and self._log.allow():
            log.warning(
                "cluster membership: Redis at %s lost this member's key (%s) although it answered "
                "(flushed, keys evicted, or failed over); registered again, keeping the members seen in "
                "the last %gs (%d similar messages suppressed)",
                self._address,
                self.member_id,
                self.config.timeout,
                self._log.take_suppressed(),
            )
        self._last_seen.update(dict.fromkeys(found, now))
        self.connected = True
        self._update(found)
        return True

    async def _read_members(self, client: Redis) -> set[str]:
        found = set()
        async for key in client.scan_iter(match=self._match, count=SCAN_COUNT):
            try:
                text = key.decode("utf-8") if isinstance(key, bytes) else str(key)
            except UnicodeDecodeError:
                continue
            member = text.removeprefix(self._key_prefix)
            if member:
                found.add(member)
        return found

    async def _listen_loop(self) -> None:
        """Wake the sync loop on every join or leave published, and right after (re)subscribing: messages
        published while not subscribed were missed. A pub/sub connection that fails or goes silent
        (pinged while quiet, unanswered for `timeout`) is replaced; meanwhile only the wake-ups are
        missed, and the heartbeat's reads alone say whether Redis answers."""
        loop = asyncio.get_running_loop()
        while self._running:
            client = self._client
            assert client is not None
            pubsub = client.pubsub()
            try:
                async with pubsub:
                    await pubsub.subscribe(self._channel)
                    pinged: float | None = None  # when a ping went unanswered so far
                    while self._running:
                        message = await pubsub.get_message(timeout=self.config.heartbeat)
                        if message is not None:
                            pinged = None
                            if message["type"] != "pong":
                                self._wake.set()
                        elif pinged is None:
                            await pubsub.ping()
                            pinged = loop.time()
                        elif loop.time() - pinged >= self.config.timeout:
                            raise ConnectionError(f"no answer to a ping for {self.config.timeout:g}s")
            except (RedisError, OSError) as error:
                self._failed("listening for member changes", error, disconnect=False)
            await asyncio.sleep(self.config.heartbeat)

    def _update(self, found: set[str]) -> None:
        found.add(self.member_id)
        now = asyncio.get_running_loop().time()
        if now < self._hold_until:
            seen = self._last_seen
            found.update(m for m in self.members if now - seen.get(m, now) < self.config.timeout)
        self._last_seen = {member: self._last_seen.get(member, now) for member in found}
        members = tuple(sorted(found))
        if members == self.members:
            return
        previous = set(self.members)
        self.members = members
        if self._starting:
            return
        self.changes += 1
        log.info(
            "cluster membership: %d member%s (joined: %s; left: %s)",
            len(members),
            "" if len(members) == 1 else "s",
            ", ".join(sorted(found - previous)) or "none",
            ", ".join(sorted(previous - found)) or "none",
        )
        for callback in list(self._callbacks):
            try:
                callback(members)
            except Exception:
                log.exception("cluster membership: a callback on member changes failed")

    def _failed(self, what: str, error: Exception, warn: bool = True, disconnect: bool = True) -> None:
        """Count and log a failed operation; with `disconnect`, Redis counts as unreachable until an
        operation succeeds again (the member then registers again)."""
        if disconnect:
            self.connected = False
        self.errors += 1
        self._last_error_is_auth = isinstance(error, AuthenticationError)
        self._last_error = self._describe(error)
        if not warn or self._starting or not self._log.allow():
            return
        log.warning(
            "cluster membership: %s at Redis %s failed: %s; keeping the last known members (%d) "
            "(%d similar messages suppressed)",
            what,
            self._address,
            self._last_error,
            len(self.members),
            self._log.take_suppressed(),
        )

    def _describe(self, error: Exception) -> str:
        """The error as text without any secret of the connection, whatever the client library put in it."""
        text = str(error).rstrip(". ") or type(error).__name__
        if isinstance(error, AuthenticationError):
            hint = (
                "check cluster.redis.username and cluster.redis.password"
                if self._secrets
                else "Redis wants credentials: set cluster.redis.password"
            )
            text = f"authentication failed: {text} ({hint})"
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


def _connect_options(config: RedisMembershipConfig) -> tuple[dict[str, Any], list[str]]:
    """Client options for `config` (a URL's own credentials and db win over the config's), and the secrets
    to keep out of messages. Raises ConfigError for an address that cannot be used."""
    password = config.password.get_secret_value() if config.password is not None else None
    secrets = [password] if password else []
    if "://" in config.address:
        try:
            url_options = parse_url(config.address)
        except ValueError as error:
            raise ConfigError(f"cluster.redis.address: {error}") from None
        url_password = url_options.get("password")
        if isinstance(url_password, str) and url_password:
            secrets.append(url_password)
    else:
        _host_port(config.address)
    options: dict[str, Any] = {
        "db": config.db,
        "username": config.username,
        "password": password,
        "socket_timeout": config.timeout,
        "socket_connect_timeout": config.timeout,
        # Retrying is this module's job: a failed operation should fail at once and be counted.
        "retry": Retry(NoBackoff(), 0),
        # One connection for commands, so a leave's DEL is never overtaken by an earlier SET.
        "single_connection_client": True,
    }
    return options, secrets


def _host_port(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (or just 'host', on the default port) as (host, port)."""
    if ":" not in address:
        return address, DEFAULT_REDIS_PORT
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"cluster.redis.address: {address!r} is not host:port or a redis://, rediss:// or unix:// URL"
        )
    return host, int(port)


def _display_address(address: str) -> str:
    """The address for messages: a URL without its password and query (which may hold one)."""
    if "://" not in address:
        return address
    parts = urlsplit(address)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _glob_escape(text: str) -> str:
    """`text` matched literally in a Redis MATCH pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)
