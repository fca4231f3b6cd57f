"""Forwarding between cluster members: traces another member owns, trace decisions, and buffered traces
handed over on a membership change, batched per peer into requests over persistent connections.

A connection (TCP, or a unix socket between workers) starts with MAGIC from the sender; then the sender
writes request frames and the PeerServer answers each with a reply frame, in order. A frame is its
length (4 bytes, little-endian) and its bytes; a reply is msgpack [status, accepted, retry after,
text] (`Reply`). Frames are read straight into one buffer per connection and handled as soon as they
are complete: no HTTP parsing, no chunk joins, no task per request.

A request body is a msgpack stream: the format version, then one array per message.

    [TRACES, hops, header, runs]           traces for the peer to merge into its own
    [DECISIONS, [[kept, policy, probability, trace ids joined], ...]]   decisions grouped by outcome

A TRACES message carries traces as the sender summarized them (TraceBuffer.add_spans, or buffered
traces handed over). `header` is msgpack [scopes, trace records, run scopes, run lengths, ring]: `scopes`
lists each [ResourceSpans fields, ScopeSpans fields] the runs use, `trace records` packs a TRACE_RECORD
per trace, and per run of spans (a trace's spans of one scope, in trace order) the two arrays give its
scope's index and its length; `ring` is the digest of the members the sender routed by (0: unknown).
`runs`, the last bin, holds the runs themselves: framed spans as they arrived, never re-encoded. The
owner merges each trace into its own in one step: neither side reads or frames a span again, and an
owner whose ring has the sender's digest does not look the traces up again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import struct
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import msgpack

from sampler.buffer import Trace
from sampler.config import MAX_BATCH_BYTES, ForwardConfig
from sampler.errors import DecodeError, PeerOverloaded
from sampler.logthrottle import LogThrottle
from sampler.otlp_wire import Scope

log = logging.getLogger(__name__)

# What a sender writes first on each connection to a peer's PeerServer.
MAGIC = b"TGF\x01"
# Requests and replies are frames: their length, then their bytes.
FRAME_HEADER = struct.Struct("<I")
FORMAT_VERSION = 4
# Message kinds, the first element of each message.
DECISIONS = 2
TRACES = 3
# A peer takes requests of this size at most. A request holds a batch at most (`forward.max_batch_bytes`,
# itself at most MAX_BATCH_BYTES), or one message over it: a single trace larger than a batch.
DEFAULT_MAX_REQUEST_BYTES = MAX_BATCH_BYTES + 16
# One record per trace (Trace.summary): trace id, span count, spans with a status code, status code bits,
# earliest start, latest end, root seen; then how many runs of spans it has.
TRACE_RECORD = struct.Struct("<16sIIIQQ?I")
_TRACE_ID_BYTES = 16
_ZERO_TRACE_ID = bytes(_TRACE_ID_BYTES)
_ERROR_SNIPPET = 200
# A PeerServer reads into a buffer with room for this many bytes at least; one that grew for a large
# frame is replaced once it is empty, when over _KEEP_BYTES.
_READ_BYTES = 256 * 1024
_KEEP_BYTES = 8 << 20
_MAX_REPLY_BYTES = 64 * 1024
# What a decision costs in a DECISIONS message at most: its trace id, and its group's share.
_DECISION_BYTES = 128
# Backoff jitter as in the exporters' retries: each wait is the interval ±50%.
JITTER = 0.5


class ForwardedDecision(NamedTuple):
    """A decision a member made on a trace, for members that see its late spans."""

    trace_id: bytes
    kept: bool
    policy: str  # the deciding policy's name ("" when dropped by no particular policy)
    probability: float  # the keep probability (adjusted counts); 1 when certain


# Makes the Scope of a resource and a scope in wire form (TraceBuffer.intern_scope: the buffer's shared
# one), None when they are not valid OTLP.
InternScope = Callable[[bytes, bytes], Scope | None]
# What a PeerServer hands received messages to: traces with their hop count and the sender's ring digest,
# decisions.
TracesHandler = Callable[[list[Trace], int, int], None]
DecisionsHandler = Callable[[list[ForwardedDecision]], None]


@dataclass(slots=True)
class TracesMessage:
    """Traces for the receiving member to merge into its own."""

    traces: list[Trace]
    hops: int
    ring: int = 0  # the digest of the ring the sender routed them by (Ring.digest); 0 when unknown


@dataclass(slots=True)
class DecisionsMessage:
    """Decisions made by the sending member (their order within a message is not kept)."""

    decisions: list[ForwardedDecision]


Message = TracesMessage | DecisionsMessage


# -- encoding --------------------------------------------------------------------------------------------


def traces_message(traces: Iterable[Trace], hops: int, ring: int = 0) -> tuple[bytes, ...]:
    """A TRACES message in parts: the msgpack array with its header and the runs bin's length, then the
    runs themselves, the traces' own bytes objects, never joined here (the connection writes them as
    they are). Traces without spans are left out."""
    records: list[bytes] = []
    items: list[bytes | Scope] = []  # every trace's alternating scope and run, in order
    pack_trace = TRACE_RECORD.pack
    for trace in traces:
        if trace.span_count:
            records.append(pack_trace(*trace.summary(), len(trace.items) >> 1))
            items += trace.items
    scopes: dict[Scope, int] = {}
    run_scopes = [scopes.setdefault(scope, len(scopes)) for scope in cast(list[Scope], items[::2])]
    runs = cast(list[bytes], items[1::2])
    run_lengths = list(map(len, runs))
    header: bytes = msgpack.packb(
        [
            [[scope.resource, scope.scope] for scope in scopes],
            b"".join(records),
            run_scopes,
            run_lengths,
            ring,
        ],
        use_bin_type=True,
    )
    prefix = _ARRAY_OF_4 + _TRACES_KIND + msgpack.packb(hops) + _BIN32.pack(0xC6, len(header))
    return (prefix + header + _BIN32.pack(0xC6, sum(run_lengths)), *runs)


def encode_traces(traces: Iterable[Trace], hops: int, ring: int = 0) -> bytes:
    """A TRACES message in one piece."""
    return b"".join(traces_message(traces, hops, ring))


def encode_decisions(decisions: Iterable[ForwardedDecision]) -> bytes:
    """A DECISIONS message; ValueError for a trace id that is not 16 bytes."""
    groups: dict[tuple[bool, str, float], list[bytes]] = {}
    for trace_id, kept, policy, probability in decisions:
        if len(trace_id) != _TRACE_ID_BYTES:
            raise ValueError(f"a decision's trace id must be {_TRACE_ID_BYTES} bytes, not {len(trace_id)}")
        groups.setdefault((bool(kept), policy, float(probability)), []).append(trace_id)
    fields = [
        [kept, policy, probability, b"".join(ids)] for (kept, policy, probability), ids in groups.items()
    ]
    packed: bytes = msgpack.packb([DECISIONS, fields], use_bin_type=True)
    return packed


_VERSION: bytes = msgpack.packb(FORMAT_VERSION)
_ARRAY_OF_4 = b"\x94"  # msgpack fixarray of 4
_TRACES_KIND: bytes = msgpack.packb(TRACES)
_BIN32 = struct.Struct(">BI")  # msgpack bin 32: marker, length


def body_parts(messages: Iterable[Iterable[bytes]]) -> list[bytes]:
    """A request body in parts: the format version, then each message's parts."""
    parts = [_VERSION]
    for message in messages:
        parts += message
    return parts


def encode_body(messages: Iterable[bytes]) -> bytes:
    """A request body in one piece."""
    return b"".join(body_parts((message,) for message in messages))


# -- decoding --------------------------------------------------------------------------------------------


def decode_body(body: bytes, intern: InternScope = Scope) -> list[Message]:
    """The messages of a request body, their scopes made by `intern`; DecodeError naming what is wrong.
    Nothing is handed on from a body that does not decode in full.

    TRACES messages as `traces_message` writes them are read without copying their runs out of the body
    but once, run by run; anything else goes through msgpack.
    """
    if not body:
        raise DecodeError("empty body: expected the format version")
    if body[:1] != _VERSION:
        _unpack_version(body)  # raises, naming what it found
    view = memoryview(body)
    messages: list[Message] = []
    pos = 1
    while pos < len(body):
        found = _traces_at(body, view, pos, intern)
        if found is None:
            item, pos = _unpack_at(view, pos)
            found = decode_message(item, intern), pos
        messages.append(found[0])
        pos = found[1]
    return messages


def _traces_at(body: bytes, view: memoryview, pos: int, intern: InternScope) -> tuple[Message, int] | None:
    """The TRACES message at `pos` and where it ends, if it has the shape `traces_message` writes (array
    of 4, fixint kind and hops, two bin 32); None for any other shape."""
    if (
        len(body) - pos < 8
        or body[pos] != _ARRAY_OF_4[0]
        or body[pos + 1] != TRACES
        or body[pos + 2] >= 0x80
        or body[pos + 3] != 0xC6
    ):
        return None
    header_end = pos + 8 + int.from_bytes(body[pos + 4 : pos + 8], "big")
    if header_end + 5 > len(body):
        raise DecodeError(f"truncated body: a message is cut off after byte {pos} of {len(body)}")
    if body[header_end] != 0xC6:
        return None
    runs_start = header_end + 5
    stop = runs_start + int.from_bytes(body[header_end + 1 : runs_start], "big")
    if stop > len(body):
        raise DecodeError(f"truncated body: a message is cut off after byte {pos} of {len(body)}")
    header = _unpack_header(view[pos + 8 : header_end], intern)
    return TracesMessage(_traces(header, body, runs_start, stop), body[pos + 2], header.ring), stop


def _unpack_at(view: memoryview, pos: int) -> tuple[Any, int]:
    """The msgpack object at `pos` and where it ends."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(view), 1), use_list=True, raw=False)
    unpacker.feed(view[pos:])
    try:
        item = unpacker.unpack()
    except msgpack.OutOfData:
        raise DecodeError(f"truncated body: a message is cut off after byte {pos} of {len(view)}") from None
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise DecodeError(f"malformed msgpack body: {type(error).__name__}: {error}") from None
    return item, pos + unpacker.tell()


def _unpack_version(body: bytes) -> None:
    try:
        version, _ = _unpack_at(memoryview(body), 0)
    except DecodeError as error:
        raise DecodeError(f"{error} (expected the format version {FORMAT_VERSION})") from None
    raise DecodeError(f"unsupported forward format version {version!r} (expected {FORMAT_VERSION})")


def decode_message(item: Any, intern: InternScope = Scope) -> Message:
    """One unpacked message, its scopes made by `intern`; DecodeError when it is not one of the known
    kinds and shapes."""
    if not isinstance(item, list) or not item:
        raise DecodeError("a message must be a non-empty array")
    kind = item[0]
    if type(kind) is int:
        if kind == TRACES and len(item) == 4:
            header, runs = item[2], item[3]
            if not isinstance(header, bytes) or not isinstance(runs, bytes):
                raise DecodeError("a traces message must be [3, hops, header (binary), runs (binary)]")
            unpacked = _unpack_header(header, intern)
            return TracesMessage(_traces(unpacked, runs, 0, len(runs)), _hops(item[1]), unpacked.ring)
        if kind == DECISIONS and len(item) == 2:
            return DecisionsMessage(_decisions(item[1]))
    raise DecodeError(f"unknown message kind {kind!r} with {len(item) - 1} fields")


def _hops(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise DecodeError(f"hops must be a non-negative integer, not {value!r}")
    return value


def _unpack_header(data: bytes | memoryview, intern: InternScope) -> _Header:
    """A TRACES message's header: its scopes, trace records and each run's scope and length, checked for
    shape."""
    try:
        header = msgpack.unpackb(data, use_list=True, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise DecodeError(f"malformed traces header: {type(error).__name__}: {error}") from None
    if (
        not isinstance(header, list)
        or len(header) != 5
        or not isinstance(header[0], list)
        or not isinstance(header[1], bytes)
        or len(header[1]) % TRACE_RECORD.size
        or not isinstance(header[2], list)
        or not isinstance(header[3], list)
        or len(header[2]) != len(header[3])
        or _not_counts(header[2])
        or _not_counts(header[3])
        or type(header[4]) is not int
    ):
        raise DecodeError(
            "a traces header must be [scopes, trace records (binary), run scopes, run lengths (arrays of "
            "non-negative integers of one length), ring (an integer)]"
        )
    scopes: list[Scope] = []
    for pair in header[0]:
        if not isinstance(pair, list) or len(pair) != 2 or not all(type(part) is bytes for part in pair):
            raise DecodeError("a scope must be [resource (binary), scope (binary)]")
        scope = intern(pair[0], pair[1])
        if scope is None:
            raise DecodeError("a scope of a traces message is not a valid OTLP resource and scope")
        scopes.append(scope)
    return _Header(scopes, header[1], header[2], header[3], header[4])


class _Header(NamedTuple):
    scopes: list[Scope]
    records: bytes  # a TRACE_RECORD per trace
    run_scopes: list[int]  # per run: its scope's index in `scopes`
    run_lengths: list[int]
    ring: int


def _not_counts(values: list[Any]) -> bool:
    """Whether `values` hold anything but non-negative integers (in C: a float makes the sum a float)."""
    try:
        return bool(values) and (type(sum(values)) is not int or min(values) < 0)
    except TypeError:  # not all numbers
        return True


def _traces(header: _Header, body: bytes, start: int, stop: int) -> list[Trace]:
    """The traces a TRACES message carries, their runs taken from `body[start:stop]`."""
    scopes, records, run_scopes, run_lengths, _ = header
    # Where each run starts (and the last ends), then every trace's alternating scope and run, in order.
    offsets = list(itertools.accumulate(run_lengths, initial=start))
    if offsets[-1] != stop:
        raise DecodeError("a traces message's run lengths do not add up to its runs")
    items: list[bytes | Scope] = [b""] * (2 * len(run_lengths))
    try:
        items[::2] = [scopes[index] for index in run_scopes]
    except IndexError:
        raise DecodeError("a run of a traces message refers to a scope it does not have") from None
    items[1::2] = [body[begin:end] for begin, end in itertools.pairwise(offsets)]
    traces: list[Trace] = []
    run = 0
    detached = Trace.detached
    for trace_id, span_count, coded, codes, min_start, max_end, root, run_count in TRACE_RECORD.iter_unpack(
        records
    ):
        if trace_id == _ZERO_TRACE_ID or not span_count or not run_count:
            raise DecodeError("a forwarded trace must have a trace id (not all zero), spans and runs")
        end = run + run_count
        if end > len(run_lengths):
            raise DecodeError("a traces message's trace records do not match its runs")
        traces.append(
            detached(
                trace_id,
                span_count,
                coded,
                codes,
                min_start,
                max_end,
                root,
                items[2 * run : 2 * end],
                offsets[end] - offsets[run],
            )
        )
        run = end
    if run != len(run_lengths):
        raise DecodeError("a traces message's trace records do not match its runs")
    return traces


def _decisions(value: Any) -> list[ForwardedDecision]:
    if not isinstance(value, list):
        raise DecodeError("decisions must be an array of groups")
    decisions: list[ForwardedDecision] = []
    for group in value:
        if not isinstance(group, list) or len(group) != 4:
            raise DecodeError("a decision group must be [kept, policy, probability, trace ids]")
        kept, policy, probability, ids = group
        if (
            type(kept) is not bool
            or type(policy) is not str
            or type(probability) not in (float, int)
            or type(ids) is not bytes
            or len(ids) % _TRACE_ID_BYTES
        ):
            raise DecodeError("a decision group must be [bool, str, number, trace ids joined 16 bytes each]")
        probability = float(probability)
        # A keep probability: NaN or infinity would fail the adjusted count of each late span it meets.
        if not 0.0 <= probability <= 1.0:
            raise DecodeError(f"a decision's probability must be from 0 to 1, not {probability!r}")
        decisions.extend(
            ForwardedDecision(ids[start : start + _TRACE_ID_BYTES], kept, policy, probability)
            for start in range(0, len(ids), _TRACE_ID_BYTES)
        )
    return decisions


# -- the receiving side ----------------------------------------------------------------------------------


@dataclass
class ServerStats:
    """What a PeerServer received, as plain counters for metrics."""

    requests: int = 0  # acknowledged with 200
    spans: int = 0  # handed to the handlers, handed-over traces included
    decisions: int = 0
    malformed: int = 0  # answered 4xx
    overloaded: int = 0  # answered 503 because a handler raised PeerOverloaded
    errors: int = 0  # answered 500 because a handler failed


class PeerServer:
    """Takes forwarded messages from peers and hands them, in order, to synchronous handlers.

    Peers connect and write MAGIC, then request frames, one at a time: each is answered by a reply frame
    (see `Reply`) once it was handled: 200 after every message in it was handed on; 400 with a message
    when its body does not decode (nothing handed on); 413 for a frame over `max_request_bytes` (its
    bytes are read and dropped, the connection goes on); 503 with a retry delay when a handler raises
    PeerOverloaded; 500 when a handler fails. A connection that does not start with MAGIC gets a plain
    HTTP 400 saying what this port speaks, and is closed.
    """

    def __init__(
        self,
        endpoint: str,
        on_traces: TracesHandler,
        on_decisions: DecisionsHandler,
        *,
        intern_scope: InternScope = Scope,
        unix_path: str | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        shutdown_grace: float = 5.0,
    ) -> None:
        self.endpoint = endpoint
        self.on_traces = on_traces
        self.on_decisions = on_decisions
        self.intern_scope = intern_scope
        self.unix_path = unix_path
        self.max_request_bytes = max_request_bytes
        self.shutdown_grace = shutdown_grace
        self.port: int | None = None
        self.stats = ServerStats()
        self._server: asyncio.Server | None = None
        self._connections: set[_PeerConnection] = set()
        self._stopping = False
        self._closed = asyncio.Event()
        self._error_log = LogThrottle()

    async def start(self) -> None:
        """Listen on `unix_path` when given, else on `endpoint` (host:port)."""
        loop = asyncio.get_running_loop()
        if self.unix_path is not None:
            self._server = await loop.create_unix_server(self._connection, self.unix_path)
        else:
            self._server = await loop.create_server(
                self._connection, *_host_port(self.endpoint), reuse_address=True
            )
            self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("cluster forward server listening on %s", self.unix_path or f"{self.endpoint} ({self.port})")

    async def stop(self) -> None:
        """Stop accepting; requests whose frames are still arriving get `shutdown_grace` to complete."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()
        for connection in list(self._connections):
            connection.close_when_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.shutdown_grace):
                while self._connections:
                    self._closed.clear()
                    await self._closed.wait()
        for connection in list(self._connections):
            connection.abort()
        self._connections.clear()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _connection(self) -> _PeerConnection:
        connection = _PeerConnection(self)
        if self._stopping:  # a connection accepted just before
            connection.close_when_idle()
        return connection

    def answer(self, body: bytes) -> Reply:
        """Decode a request body and hand its messages on; the reply for the sender."""
        try:
            messages = decode_body(body, self.intern_scope)
        except DecodeError as error:
            self.stats.malformed += 1
            self._log_error("malformed request from a peer: %s", error)
            return Reply(400, 0, 0.0, str(error))
        except Exception:  # a bug: the connection and the server go on
            self.stats.errors += 1
            log.exception("cluster forward: decoding a request failed")
            return Reply(500, 0, 0.0, "decoding failed")
        for index, message in enumerate(messages):
            try:
                self._hand_on(message)
            except PeerOverloaded as overloaded:
                self.stats.overloaded += 1
                return Reply(503, index, max(0.0, overloaded.retry_after), str(overloaded))
            except Exception:
                self.stats.errors += 1
                log.exception("cluster forward: handler failed on a %s message", type(message).__name__)
                return Reply(500, index, 0.0, "handler failed")
        self.stats.requests += 1
        return Reply(200, len(messages), 0.0, "")

    def too_large(self, size: int) -> Reply:
        self.stats.malformed += 1
        self._log_error("a peer sent a request of %d bytes, over max_request_bytes", size)
        return Reply(
            413, 0, 0.0, f"request of {size} bytes exceeds max_request_bytes ({self.max_request_bytes})"
        )

    def not_a_peer(self, remote: object) -> None:
        self.stats.malformed += 1
        self._log_error("closed a connection from %s that is not a tailgate forward stream", remote)

    def opened(self, connection: _PeerConnection) -> None:
        self._connections.add(connection)

    def closed(self, connection: _PeerConnection) -> None:
        self._connections.discard(connection)
        self._closed.set()

    def _hand_on(self, message: Message) -> None:
        if isinstance(message, TracesMessage):
            self.on_traces(message.traces, message.hops, message.ring)
            self.stats.spans += _span_count(message.traces)
        else:
            self.on_decisions(message.decisions)
            self.stats.decisions += len(message.decisions)

    def _log_error(self, text: str, *args: object) -> None:
        if self._error_log.allow():
            log.warning(text + " (%d similar messages suppressed)", *args, self._error_log.take_suppressed())


class _PeerConnection(asyncio.BufferedProtocol):
    """One peer's connection to a PeerServer: frames are read into one buffer, each handled as soon as it
    is complete (the handlers are synchronous) and answered on the same connection."""

    def __init__(self, server: PeerServer) -> None:
        self._server = server
        self._buffer = bytearray(_READ_BYTES)
        self._view = memoryview(self._buffer)
        self._filled = 0
        self._greeted = False
        self._skip = 0  # bytes of a frame over max_request_bytes still to be dropped
        self._frame_bytes = 0  # the size of the frame that is arriving, its header included
        self._closing = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._server.opened(self)
        # Made after the server began stopping (accepted as it stopped, or told to close before it had a
        # transport): closed before it takes a frame, or spans could be taken after `stop` returned.
        if self._closing or self._server.stopping:
            self.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._server.closed(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if len(self._buffer) - self._filled < _READ_BYTES:
            self._grow(self._filled + _READ_BYTES)
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        pos = self._frames()
        if pos:
            rest = self._filled - pos
            self._view[:rest] = self._view[pos : self._filled]
            self._filled = rest
        if self._frame_bytes + _READ_BYTES > len(self._buffer):
            # Room for the whole frame, so it arrives in as few reads as the socket allows.
            self._grow(self._frame_bytes + _READ_BYTES)
        elif not self._filled and len(self._buffer) > _KEEP_BYTES:
            self._buffer = bytearray(_READ_BYTES)
            self._view = memoryview(self._buffer)
        if self._closing and self.idle:
            self.abort()

    def eof_received(self) -> bool:
        return False

    # A sender that does not read its replies: stop reading its requests until it does.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    @property
    def idle(self) -> bool:
        """No frame has started arriving."""
        return not self._filled and not self._skip

    def close_when_idle(self) -> None:
        self._closing = True
        if self.idle:
            self.abort()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _frames(self) -> int:
        """Handle every complete frame in the buffer; where the unhandled bytes start."""
        view, filled, pos = self._view, self._filled, 0
        if not self._greeted:
            if bytes(view[: min(filled, len(MAGIC))]) != MAGIC[: min(filled, len(MAGIC))]:
                self._refuse_stranger()
                return filled
            if filled < len(MAGIC):
                return 0
            self._greeted = True
            pos = len(MAGIC)
        server = self._server
        while self._transport is not None:
            if self._skip:
                dropped = min(self._skip, filled - pos)
                self._skip -= dropped
                pos += dropped
                if self._skip:
                    break
            if filled - pos < FRAME_HEADER.size:
                break
            (size,) = FRAME_HEADER.unpack_from(view, pos)
            if size > server.max_request_bytes:
                self._reply(server.too_large(size))
                self._skip = size
                pos += FRAME_HEADER.size
                continue
            end = pos + FRAME_HEADER.size + size
            if end > filled:
                self._frame_bytes = FRAME_HEADER.size + size
                break
            self._frame_bytes = 0
            self._reply(server.answer(bytes(view[pos + FRAME_HEADER.size : end])))
            pos = end
        return pos

    def _grow(self, size: int) -> None:
        """A new buffer of `size` bytes at least, holding the bytes received so far."""
        buffer = bytearray(max(size, 2 * len(self._buffer)))
        buffer[: self._filled] = self._view[: self._filled]
        self._buffer = buffer
        self._view = memoryview(buffer)

    def _reply(self, reply: Reply) -> None:
        if self._transport is not None:
            self._transport.write(reply.frame())

    def _refuse_stranger(self) -> None:
        if self._transport is None:
            return
        self._server.not_a_peer(self._transport.get_extra_info("peername"))
        text = b"this port speaks the tailgate cluster forward stream, not HTTP\n"
        self._transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(text)).encode() + b"\r\n\r\n" + text
        )
        self._transport.close()
        self._transport = None


class Reply(NamedTuple):
    """A PeerServer's answer to a request frame: an HTTP-like status; how many messages of the request,
    from its start, were handed on; on 503 the seconds the sender should wait; what went wrong."""

    status: int
    accepted: int
    retry_after: float
    text: str

    def frame(self) -> bytes:
        data: bytes = msgpack.packb(tuple(self))
        return FRAME_HEADER.pack(len(data)) + data

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        try:
            status, accepted, retry_after, text = msgpack.unpackb(data, raw=False)
            reply = cls(int(status), int(accepted), float(retry_after), str(text))
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise DecodeError(f"malformed reply: {type(error).__name__}: {error}") from None
        return reply


def _span_count(traces: Iterable[Trace]) -> int:
    return sum(trace.span_count for trace in traces)


# -- the sending side ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts to deliver a request to a peer: from `initial`, times `multiplier` after
    each failure, at most `maximum`, each ±50% jitter. A peer's retry delay (503) replaces the interval."""

    initial: float = 0.1
    maximum: float = 2.0
    multiplier: float = 2.0


@dataclass
class PeerStats:
    """What a Forwarder did for one peer, as plain counters for metrics."""

    spans: int = 0  # acknowledged by the peer
    decisions: int = 0
    bytes: int = 0  # message bytes acknowledged
    requests: int = 0  # acknowledged requests
    failures: int = 0  # attempts that failed: connection, timeout, 5xx
    retries: int = 0  # attempts made after a failure
    refused_spans: int = 0  # not queued: send_spans / send_traces returned False
    refused_decisions: int = 0
    rejected_spans: int = 0  # refused by the peer for good (4xx), not retried
    rejected_decisions: int = 0
    dropped_spans: int = 0  # still queued when the peer was forgotten or the forwarder closed
    dropped_decisions: int = 0


@dataclass(frozen=True)
class Pending:
    """What is queued or in flight for a peer."""

    messages: int
    spans: int
    decisions: int
    bytes: int
    in_flight: bool


@dataclass(slots=True, eq=False)
class _Entry:
    """One queued message, encoded: its parts are sent one after the other, never joined."""

    kind: int
    parts: tuple[bytes, ...]
    spans: int
    decisions: int
    queued_at: float
    size: int = 0

    def __post_init__(self) -> None:
        self.size = sum(map(len, self.parts))

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


@dataclass(eq=False)
class _Peer:
    address: str
    queue: deque[_Entry] = field(default_factory=deque)
    # One list per sender: the entries of the request it has in flight.
    lanes: list[list[_Entry]] = field(default_factory=list)
    bytes: int = 0  # queued and in flight
    unsent_bytes: int = 0  # queued only
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    senders: list[asyncio.Task[None]] = field(default_factory=list)
    # Set by `settle`: senders finish the requests they have in flight and start no new one.
    paused: bool = False
    # Connections no sender is using.
    idle: list[_Connection] = field(default_factory=list)

    @property
    def in_flight(self) -> list[_Entry]:
        return [entry for lane in self.lanes for entry in lane]

    def entries(self) -> list[_Entry]:
        return [*self.in_flight, *self.queue]

    def take_idle(self) -> _Connection | None:
        """A connection no sender is using that the peer has not closed meanwhile (it stopped, or
        restarted)."""
        while self.idle:
            connection = self.idle.pop()
            if connection.usable:
                return connection
            connection.close()
        return None

    def close_idle(self) -> None:
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class _Retry(Exception):
    def __init__(self, reason: str, delay: float | None = None, accepted: int = 0) -> None:
        super().__init__(reason)
        self.delay = delay
        self.accepted = accepted


class _Rejected(Exception):
    def __init__(self, reason: str, accepted: int = 0) -> None:
        super().__init__(reason)
        self.accepted = accepted


class Forwarder:
    """Per-peer queues of encoded messages, each sent by `max_in_flight` sender tasks over a persistent
    connection each.

    `send_*` only queue (never await): a peer's queue is sent as one request when it holds
    `max_batch_bytes` or `max_delay` after its oldest message. With one request in flight per peer (the
    default) messages arrive in the order they were queued. A failed request (connection, timeout, 5xx) is
    retried with backoff until the peer acknowledges it, the peer is forgotten or the forwarder closes;
    what is then still queued is counted as dropped. Peers are "host:port" or "unix:/path".
    Must be used from a running event loop.
    """

    def __init__(self, config: ForwardConfig, *, backoff: Backoff | None = None) -> None:
        self.config = config
        self.backoff = backoff or Backoff()
        self.stats: dict[str, PeerStats] = {}
        self._peers: dict[str, _Peer] = {}
        self._flushing = 0
        self._closed = False
        # Set whenever something leaves a queue, for flush.
        self._progress = asyncio.Event()
        self._failure_log = LogThrottle()
        self._refusal_log = LogThrottle()

    def send_traces(
        self, peer: str, traces: Sequence[Trace], hops: int, force: bool = False, *, ring: int = 0
    ) -> bool:
        """Queue traces for `peer` to merge into its own: summarized here, or buffered here and handed
        over. False, with nothing queued, when its queue has no room for them (or, with `force`, only when
        the forwarder is closed: the queue may then exceed its bound).

        `hops` reaches the peer's handler as given: the caller counts how often spans were forwarded;
        `ring` too, the digest of the ring the caller routed them by (Ring.digest).
        """
        spans = _span_count(traces)
        if not spans:
            return True
        if self._closed or (not force and self._refusing(peer)):
            return self._refuse(peer, spans, 0)
        return self._enqueue(peer, self._traces_entries(traces, spans, hops, ring), force)

    def _traces_entries(self, traces: Sequence[Trace], spans: int, hops: int, ring: int) -> list[_Entry]:
        """`traces` as TRACES messages of at most `max_batch_bytes` each (a larger trace alone), so that
        no request is larger than a batch and the peer takes it: a handover or a large client request
        is cut in halves until its messages fit."""
        entry = _Entry(TRACES, traces_message(traces, hops, ring), spans, 0, 0.0)
        if entry.size <= self.config.max_batch_bytes or len(traces) == 1:
            return [entry]
        half = len(traces) // 2
        return [
            entry
            for part in (traces[:half], traces[half:])
            for entry in self._traces_entries(part, _span_count(part), hops, ring)
        ]

    def full(self, peer: str, allowance: int = 0) -> bool:
        """Whether `peer`'s queue is full (or the forwarder closed): traces for it would be refused.
        `allowance`: bytes of it not to count (what the caller itself just queued)."""
        return self._refusing(peer, allowance)

    def send_decisions(self, peer: str, decisions: Sequence[ForwardedDecision], force: bool = False) -> bool:
        """Queue decisions for `peer`; False when its queue has no room for them (or, with `force`, only
        when the forwarder is closed)."""
        if not decisions:
            return True
        if self._closed or (not force and self._refusing(peer)):
            return self._refuse(peer, 0, len(decisions))
        # A handover's decisions in messages of at most a batch each (an id takes 16 bytes and its group's
        # policy and probability a few more).
        step = max(1, self.config.max_batch_bytes // _DECISION_BYTES)
        chunks = [decisions[start : start + step] for start in range(0, len(decisions), step)]
        return self._enqueue(
            peer,
            [_Entry(DECISIONS, (encode_decisions(chunk),), 0, len(chunk), 0.0) for chunk in chunks],
            force,
        )

    def peers(self) -> list[str]:
        """The peers messages were queued for, and not forgotten since."""
        return list(self._peers)

    def queued_bytes(self, peer: str) -> int:
        """The bytes queued and in flight for `peer` (`pending(peer).bytes`, without counting entries)."""
        state = self._peers.get(peer)
        return 0 if state is None else state.bytes

    def pending(self, peer: str) -> Pending:
        state = self._peers.get(peer)
        if state is None:
            return Pending(0, 0, 0, 0, False)
        entries = state.entries()
        return Pending(
            messages=len(entries),
            spans=sum(entry.spans for entry in entries),
            decisions=sum(entry.decisions for entry in entries),
            bytes=state.bytes,
            in_flight=bool(state.in_flight),
        )

    def peer_stats(self, peer: str) -> PeerStats:
        """The counters of `peer` (kept after it is forgotten, as metrics counters are)."""
        return self.stats.setdefault(peer, PeerStats())

    def take_undelivered(self, peer: str, intern: InternScope = Scope) -> list[TracesMessage]:
        """Remove the traces queued or in flight for `peer` and return them decoded (their scopes made by
        `intern`), a message each in queue order, for the caller to route to their new owner; decisions
        stay queued.

        A request in flight is abandoned: the peer may have taken it already, so its spans can arrive
        twice (at least once, never lost).
        """
        state = self._peers.get(peer)
        if state is None:
            return []
        self._stop_sender(state)
        state.paused = False
        entries = list(state.queue)
        state.queue.clear()
        undelivered: list[TracesMessage] = []
        for entry in entries:
            if entry.kind == DECISIONS:
                state.queue.append(entry)
                continue
            message = decode_message(msgpack.unpackb(entry.body, use_list=True, raw=False), intern)
            assert isinstance(message, TracesMessage)
            undelivered.append(message)
        state.bytes = state.unsent_bytes = sum(entry.size for entry in state.queue)
        if state.queue:
            self._start_sender(state)
        self._progress.set()
        return undelivered

    async def settle(self, peer: str, timeout: float) -> None:  # noqa: ASYNC109 - a bound, not a deadline
        """Let the requests in flight to `peer` finish (at most `timeout` seconds) and send no more: then
        `take_undelivered` returns only what the peer has not taken. A peer that left gracefully answers
        them; one that is gone fails them, and they are taken back as undelivered."""
        state = self._peers.get(peer)
        if state is None:
            return
        state.paused = True
        await self._until(lambda: not state.in_flight, timeout)

    def forget_peer(self, peer: str) -> None:
        """Stop sending to `peer`: what is still queued for it is dropped and counted (take_undelivered
        first to keep its spans)."""
        state = self._peers.pop(peer, None)
        if state is None:
            return
        self._drop(state, "forgotten")
        self._stop_sender(state)
        state.close_idle()
        self._progress.set()

    def backlogged(self, peer: str) -> bool:
        """Whether a whole batch for `peer` waits for a request in flight to be answered (or its queue
        is full): more spans for it would only wait longer."""
        state = self._peers.get(peer)
        return self._refusing(peer) or (
            state is not None and state.unsent_bytes >= self.config.max_batch_bytes
        )

    async def wait_for_room(self, peers: Iterable[str], timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until no queue of `peers` is backlogged (as their requests are acknowledged); False if
        one still is after `timeout` seconds."""
        peers = list(peers)
        return await self._until(lambda: not any(self.backlogged(peer) for peer in peers), timeout)

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 - a deadline for the whole flush
        """Send everything queued now, without waiting for `max_delay`, and wait until every peer
        acknowledged it; False if something is still undelivered after `timeout` seconds."""
        self._flushing += 1
        for state in self._peers.values():
            state.wake.set()
        try:
            return await self._until(lambda: not any(state.bytes for state in self._peers.values()), timeout)
        finally:
            self._flushing -= 1

    async def _until(self, done: Callable[[], bool], timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until `done()` holds, checking it each time something leaves a queue; False if it still
        does not after `timeout` seconds."""
        if done():
            return True
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    self._progress.clear()
                    await self._progress.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop every sender and close the connections; what is undelivered is counted as dropped (flush
        first for a graceful leave)."""
        self._closed = True
        peers = list(self._peers.values())
        self._peers.clear()
        senders = [sender for state in peers for sender in state.senders]
        for state in peers:
            self._drop(state, "closing")
            self._stop_sender(state)
        await asyncio.gather(*senders, return_exceptions=True)
        for state in peers:
            state.close_idle()

    # -- queueing

    def _refusing(self, peer: str, allowance: int = 0) -> bool:
        """Closed, or `peer`'s queue is full to the byte (`allowance` of it not counted): refused before
        spending time on encoding."""
        state = self._peers.get(peer)
        return self._closed or (state is not None and state.bytes - allowance >= self.config.queue_bytes)

    def _enqueue(self, peer: str, entries: list[_Entry], force: bool = False) -> bool:
        """Queue `entries` for `peer`, all or (when its queue has no room for them all) none."""
        state = self._peers.get(peer)
        if state is None:
            state = self._peers[peer] = _Peer(peer)
        size = sum(entry.size for entry in entries)
        if state.bytes + size > self.config.queue_bytes and not force:
            spans = sum(entry.spans for entry in entries)
            return self._refuse(peer, spans, sum(entry.decisions for entry in entries))
        now = asyncio.get_running_loop().time()
        for entry in entries:
            entry.queued_at = now
        state.queue.extend(entries)
        state.bytes += size
        state.unsent_bytes += size
        # The sender waits for the first message, then for a full batch or the delay.
        if len(state.queue) == len(entries) or state.unsent_bytes >= self.config.max_batch_bytes:
            state.wake.set()
        if not state.senders:
            self._start_sender(state)
        return True

    def _refuse(self, peer: str, spans: int, decisions: int) -> bool:
        stats = self.peer_stats(peer)
        stats.refused_spans += spans
        stats.refused_decisions += decisions
        if self._refusal_log.allow():
            reason = "closed" if self._closed else f"queue full ({self.config.queue_bytes} bytes)"
            log.warning(
                "cluster forward to %s: %s, refused %d spans and %d decisions (%d similar messages "
                "suppressed)",
                peer,
                reason,
                spans,
                decisions,
                self._refusal_log.take_suppressed(),
            )
        return False

    def _drop(self, state: _Peer, reason: str) -> None:
        entries = state.entries()
        spans = sum(entry.spans for entry in entries)
        decisions = sum(entry.decisions for entry in entries)
        if spans or decisions:
            stats = self.peer_stats(state.address)
            stats.dropped_spans += spans
            stats.dropped_decisions += decisions
            log.warning(
                "cluster forward to %s: %s with %d spans and %d decisions undelivered",
                state.address,
                reason,
                spans,
                decisions,
            )
        state.queue.clear()
        for lane in state.lanes:
            lane.clear()
        state.bytes = state.unsent_bytes = 0

    def _start_sender(self, state: _Peer) -> None:
        """`max_in_flight` senders, each with one request (and connection) in flight."""
        loop = asyncio.get_running_loop()
        state.lanes = [[] for _ in range(self.config.max_in_flight)]
        state.senders = [
            loop.create_task(self._send_loop(state, lane), name=f"cluster forward to {state.address}")
            for lane in state.lanes
        ]

    def _stop_sender(self, state: _Peer) -> None:
        """Cancel the senders; requests they had in flight go back to the front of the queue."""
        for sender in state.senders:
            sender.cancel()
        state.senders = []
        for entry in reversed(state.in_flight):
            state.queue.appendleft(entry)
            state.unsent_bytes += entry.size
        state.lanes = []

    # -- sending

    async def _send_loop(self, state: _Peer, lane: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        max_batch_bytes = self.config.max_batch_bytes
        while True:
            while not state.queue or state.paused:
                state.wake.clear()
                await state.wake.wait()
            deadline = state.queue[0].queued_at + self.config.max_delay
            while state.unsent_bytes < max_batch_bytes and not self._flushing and loop.time() < deadline:
                state.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await state.wake.wait()
            size = 0
            while state.queue and (not lane or size + state.queue[0].size <= max_batch_bytes):
                entry = state.queue.popleft()
                size += entry.size
                lane.append(entry)
            state.unsent_bytes -= size
            if lane:
                await self._deliver(state, lane)

    async def _deliver(self, state: _Peer, lane: list[_Entry]) -> None:
        """Send the entries in flight until the peer takes them or refuses them for good."""
        stats = self.peer_stats(state.address)
        interval = self.backoff.initial
        failed = False
        while True:
            if failed:
                stats.retries += 1
            try:
                await self._post(state, lane)
            except _Retry as failure:
                self._settle(state, lane, failure.accepted, stats, delivered=True)
                stats.failures += 1
                failed = True
                if failure.delay is not None:
                    delay = failure.delay
                else:
                    delay = min(self.backoff.maximum, interval * random.uniform(1 - JITTER, 1 + JITTER))
                interval = min(self.backoff.maximum, interval * self.backoff.multiplier)
                self._log_failure("%s; retrying in %.2fs", state.address, failure, delay)
                await asyncio.sleep(delay)
                continue
            except _Rejected as rejection:
                self._settle(state, lane, rejection.accepted, stats, delivered=True)
                rejected = list(lane)
                self._log_failure(
                    "refused %d spans and %d decisions for good: %s",
                    state.address,
                    sum(entry.spans for entry in rejected),
                    sum(entry.decisions for entry in rejected),
                    rejection,
                )
                self._settle(state, lane, len(rejected), stats, delivered=False)
                return
            stats.requests += 1
            self._settle(state, lane, len(lane), stats, delivered=True)
            return

    def _settle(
        self, state: _Peer, lane: list[_Entry], count: int, stats: PeerStats, delivered: bool
    ) -> None:
        """Take the first `count` entries of a request in flight off the queue, as delivered or rejected."""
        if not count:
            return
        done = lane[:count]
        del lane[:count]
        spans = sum(entry.spans for entry in done)
        decisions = sum(entry.decisions for entry in done)
        size = sum(entry.size for entry in done)
        state.bytes -= size
        if delivered:
            stats.spans += spans
            stats.decisions += decisions
            stats.bytes += size
        else:
            stats.rejected_spans += spans
            stats.rejected_decisions += decisions
        self._progress.set()

    async def _post(self, state: _Peer, lane: list[_Entry]) -> None:
        """One attempt at delivering a request: _Retry or _Rejected when it was not taken."""
        # The frame's length, then the body's parts.
        frame = body_parts([entry.parts for entry in lane])
        frame.insert(0, FRAME_HEADER.pack(len(_VERSION) + sum(entry.size for entry in lane)))
        connection: _Connection | None = None
        try:
            async with asyncio.timeout(self.config.timeout):
                connection = state.take_idle() or await _Connection.open(state.address)
                reply = await connection.exchange(frame)
            state.idle.append(connection)
            connection = None
        except (OSError, TimeoutError, EOFError, DecodeError) as error:  # EOFError: IncompleteReadError
            raise _Retry(f"{type(error).__name__}: {error}") from None
        except Exception as error:
            # Whatever else fails (a bad peer address, a bug) must not end the sender: it keeps retrying,
            # and saying why.
            raise _Retry(f"unexpected {type(error).__name__}: {error}") from error
        finally:
            if connection is not None:
                connection.close()
        if reply.status == 200:
            return
        reason = f"{reply.status}: {reply.text[:_ERROR_SNIPPET]}"
        accepted = min(max(0, reply.accepted), len(lane))
        if reply.status >= 500 or reply.status == 429:
            retry_after = reply.retry_after if 0 < reply.retry_after < math.inf else None
            raise _Retry(reason, retry_after, accepted)
        raise _Rejected(reason, accepted)

    def _log_failure(self, text: str, peer: str, *args: object) -> None:
        if self._failure_log.allow():
            log.warning(
                "cluster forward to %s: " + text + " (%d similar messages suppressed)",
                peer,
                *args,
                self._failure_log.take_suppressed(),
            )


class _Connection:
    """A sender's connection to a peer's PeerServer: one request frame at a time, then its reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, address: str) -> _Connection:
        """Connect to "host:port" or "unix:/path"."""
        if address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(address.removeprefix("unix:"))
        else:
            reader, writer = await asyncio.open_connection(*_host_port(address))
        writer.write(MAGIC)
        return cls(reader, writer)

    async def exchange(self, frame: list[bytes]) -> Reply:
        """Send a request frame given in parts, its length first (written as they are, never joined), and
        read its reply."""
        self._writer.writelines(frame)
        await self._writer.drain()
        (size,) = FRAME_HEADER.unpack(await self._reader.readexactly(FRAME_HEADER.size))
        if size > _MAX_REPLY_BYTES:
            raise DecodeError(f"a reply of {size} bytes: not a tailgate forward stream")
        return Reply.decode(await self._reader.readexactly(size))

    @property
    def usable(self) -> bool:
        return not self._reader.at_eof() and not self._writer.is_closing()

    def close(self) -> None:
        self._writer.close()


def _host_port(address: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" as (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)
