"""The write-ahead log of `durability: wal`: every accepted request is appended to segment files before its
client is answered, and what was not yet decided and exported when the process died is replayed at start.

Records are numbered (`seq`) in the order requests were accepted. A buffered trace remembers the seq of the
request that started it, so the oldest buffered trace bounds what is still undecided; exporters report what
they have settled (delivered, given up on, or stored in a disk queue). A checkpoint is the seq below which
every request is decided and exported: each `checkpoint_interval` the log notes the bound and the exporters'
marks, and once the exporters have settled past those marks it writes the checkpoint and deletes the
segments wholly below it.

Decisions are logged too, so that after a restart spans of a trace decided before the crash follow its
decision instead of being judged alone. In a cluster, a request's spans of traces another member owns are
queued for it (which logs them when it gets them), and buffered traces are handed to new owners when the
members change: the ids of both are logged, and left out of the replay (a request's forwarded traces from
that request, handed-over traces from every request logged before the handover). A kept decision still in
the decision cache is carried over to the newest segment when the segment holding it is deleted, for spans
that arrive late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import struct
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from sampler.buffer import DecisionCache, Kept, TraceBuffer
from sampler.config import WALConfig
from sampler.errors import ExportError, TailgateError
from sampler.exporters.base import Exporter
from sampler.exporters.queue import fsync_all, lock_directory
from sampler.metrics import Metrics

log = logging.getLogger(__name__)

# A record: MAGIC, the length of what follows the header, the CRC32 of it, the kind and the seq; then the
# body. After a damaged or torn record the data is scanned for the next MAGIC; what is found there is taken
# only if its seq goes on from the records before (see `_records`).
MAGIC = b"TGw\x01"
HEADER = struct.Struct(">4sIIBQ")
_CHECKED = struct.Struct(">BQ")  # the part of the header the CRC covers, before the body
REQUEST = 1  # body: an ExportTraceServiceRequest as accepted
DECISIONS = 2  # body: msgpack [dropped trace ids joined, [[policy, probability, kept trace ids joined], ...]]
FORWARDED = 3  # seq: a request's; body: the ids (joined) of its traces queued for other members
HANDED_OVER = 4  # body: the ids (joined) of traces handed to other members with every span logged up to seq
SEGMENT_SUFFIX = ".wal"
_SEGMENT_NAME = re.compile(r"^(\d{12})\.wal$")
CHECKPOINT_NAME = "checkpoint"
_CHECKPOINT = struct.Struct(">QI")  # seq, CRC32 of the seq
# fsync: batch syncs what was written at most this often.
BATCH_FSYNC_INTERVAL = 0.1
# After an fsync could not be tried (no file descriptor left), it is tried again this much later.
SYNC_RETRY_INTERVAL = 0.05
_TRACE_ID = 16
# A seq at or over this is damage, not a record (a numbering that starts at 0 never gets there).
_MAX_SEQ = 1 << 62
# After damage, a record found by scanning is taken if its seq is at most this far past the last one read.
_RESYNC_WINDOW = 1 << 16


class WALError(TailgateError):
    """The log cannot take a request (write failure, full): its client must not be told it was accepted."""


@dataclass(eq=False)
class Segment:
    number: int
    path: Path
    size: int = 0
    # The highest seq written to it (decision records count with the seq current when they are written).
    max_seq: int = -1
    # Trace ids of the kept decisions logged in it, carried over when it is deleted.
    kept: list[bytes] = field(default_factory=list)
    fd: int = -1


@dataclass
class Replay:
    """What `open` found to replay: requests at or after the checkpoint, in order, and logged decisions."""

    requests: list[tuple[int, bytes]] = field(default_factory=list)
    decisions: list[tuple[bytes, Kept | None]] = field(default_factory=list)
    # Per request (seq): the ids of its traces queued for other members.
    forwarded: dict[int, set[bytes]] = field(default_factory=dict)
    # The ids of traces handed to other members, each with the seq their spans were logged up to then.
    handed_over: dict[bytes, int] = field(default_factory=dict)
    corrupt: int = 0


def _records(data: bytes, last: int = -1) -> Iterator[tuple[int, int, bytes] | None]:
    """(kind, seq, body) of each sound record of a segment; None for each damaged stretch skipped.

    `last` is the highest seq read before this segment (-1: none). After damage the data is scanned for the
    next MAGIC, and a record found so is taken only if its seq goes on from `last` (a record's body is a
    client's bytes, where a record could be forged).
    """
    offset = 0
    end = len(data)
    memory = memoryview(data)
    resyncing = False
    while offset < end:
        if end - offset >= HEADER.size:
            magic, length, crc, kind, seq = HEADER.unpack_from(data, offset)
            body_end = offset + HEADER.size + length - _CHECKED.size
            if magic == MAGIC and length >= _CHECKED.size and body_end <= end and seq < _MAX_SEQ:
                body = memory[offset + HEADER.size : body_end]
                sound = zlib.crc32(body, zlib.crc32(_CHECKED.pack(kind, seq))) == crc
                if sound and (not resyncing or last < 0 or last <= seq <= last + _RESYNC_WINDOW):
                    yield kind, seq, bytes(body)
                    last = max(last, seq)
                    resyncing = False
                    offset = body_end
                    continue
        if not resyncing:
            yield None
            resyncing = True
        offset = data.find(MAGIC, offset + 1)
        if offset < 0:
            return


def encode_decisions(decisions: Sequence[tuple[bytes, Kept | None]]) -> bytes:
    dropped: list[bytes] = []
    kept: dict[Kept, list[bytes]] = {}
    for trace_id, how in decisions:
        if how is None:
            dropped.append(trace_id)
        else:
            kept.setdefault(how, []).append(trace_id)
    groups = [[how.policy, how.probability, b"".join(ids)] for how, ids in kept.items()]
    packed: bytes = msgpack.packb([b"".join(dropped), groups], use_bin_type=True)
    return packed


def decode_decisions(body: bytes) -> list[tuple[bytes, Kept | None]]:
    """The decisions of a DECISIONS record; ValueError when it is not one."""
    try:
        dropped, groups = msgpack.unpackb(body)
        decisions: list[tuple[bytes, Kept | None]] = [(trace_id, None) for trace_id in _ids(dropped)]
        for policy, probability, ids in groups:
            how = Kept(str(policy), float(probability))
            decisions.extend((trace_id, how) for trace_id in _ids(ids))
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise ValueError(f"not a decisions record: {error}") from None
    return decisions


def _ids(joined: bytes) -> list[bytes]:
    if not isinstance(joined, bytes) or len(joined) % _TRACE_ID:
        raise ValueError("trace ids are not a multiple of 16 bytes")
    return [joined[i : i + _TRACE_ID] for i in range(0, len(joined), _TRACE_ID)]


class WriteAheadLog:
    """Appends accepted requests and decisions, checkpoints what is decided and exported, replays the rest."""

    def __init__(
        self,
        config: WALConfig,
        metrics: Metrics,
        buffer: TraceBuffer,
        decisions: DecisionCache,
        exporters: Sequence[Exporter],
    ) -> None:
        self.config = config
        # Segments are cut at segment_bytes, or at a quarter of max_bytes when smaller: only closed
        # segments are deleted, so a full log must have some to free once exports catch up.
        self._segment_bytes = max(1, min(config.segment_bytes, config.max_bytes // 4))
        self.directory = Path(config.directory)
        self.buffer = buffer
        self.decisions = decisions
        self.exporters = list(exporters)
        self.bytes = 0
        self.next_seq = 0
        self.checkpoint = 0
        self._segments: deque[Segment] = deque()
        self._active: Segment | None = None
        self._next_number = 0
        self._lock_fd = -1
        self._dir_fd = -1
        # Decisions made since the last record, written before the next request (so before any late span
        # of theirs) or at the next checkpoint.
        self._journal: list[tuple[bytes, Kept | None]] = []
        decisions.journal = self._journal
        # Checkpoint candidates: (bound, each exporter's mark then), oldest first.
        self._pending: deque[tuple[int, list[int]]] = deque()
        # Whether a checkpoint round deleted the segments below the checkpoint since the log was opened.
        self._swept = False
        self._unsynced: list[int] = []
        self._written = asyncio.Event()
        self._synced_seq = -1
        self._sync_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._bytes_gauge = metrics.wal_bytes
        metrics.wal_bytes.set_function(lambda: self.bytes)
        self._replayed = metrics.wal_replayed_spans
        self._corrupt = metrics.wal_corrupt_records
        self._write_errors = metrics.wal_write_errors

    @property
    def full(self) -> bool:
        return self.bytes >= self.config.max_bytes

    # -- start and replay -------------------------------------------------------------------------------

    async def open(self) -> Replay:
        """Lock the directory and read what a previous run left (in a worker thread)."""
        replay = await asyncio.to_thread(self._open)
        self._corrupt.inc(replay.corrupt)
        return replay

    def _open(self) -> Replay:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = lock_directory(self.directory, "write-ahead log")
            self._dir_fd = os.open(self.directory, os.O_RDONLY)
            self.checkpoint = self._read_checkpoint()
            return self._recover()
        except OSError as error:
            raise ExportError(f"cannot use write-ahead log directory {self.directory}: {error}") from None

    def _read_checkpoint(self) -> int:
        try:
            data = (self.directory / CHECKPOINT_NAME).read_bytes()
        except FileNotFoundError:
            return 0
        if len(data) == _CHECKPOINT.size:
            seq, crc = _CHECKPOINT.unpack(data)
            if zlib.crc32(data[:8]) == crc:
                return int(seq)
        log.warning("%s: damaged checkpoint; replaying the whole log", self.directory / CHECKPOINT_NAME)
        return 0

    def _recover(self) -> Replay:
        replay = Replay()
        for path in sorted(self.directory.iterdir()):
            match = _SEGMENT_NAME.match(path.name)
            if match is None:
                continue
            segment = Segment(int(match.group(1)), path)
            self._next_number = segment.number + 1
            data = path.read_bytes()
            segment.size = len(data)
            for record in _records(data, self.next_seq - 1):
                if record is None:
                    replay.corrupt += 1
                    continue
                kind, seq, body = record
                segment.max_seq = max(segment.max_seq, seq)
                self.next_seq = max(self.next_seq, seq + 1)
                if kind == REQUEST and seq >= self.checkpoint:
                    replay.requests.append((seq, body))
                elif kind == DECISIONS:
                    try:
                        decided = decode_decisions(body)
                    except ValueError:
                        replay.corrupt += 1
                        continue
                    replay.decisions.extend(decided)
                    segment.kept.extend(trace_id for trace_id, how in decided if how is not None)
                elif kind in (FORWARDED, HANDED_OVER) and seq >= self.checkpoint:
                    try:
                        trace_ids = _ids(body)
                    except ValueError:
                        replay.corrupt += 1
                        continue
                    if kind == FORWARDED:
                        replay.forwarded.setdefault(seq, set()).update(trace_ids)
                        continue
                    handed_over = replay.handed_over
                    for trace_id in trace_ids:
                        if handed_over.get(trace_id, -1) < seq:
                            handed_over[trace_id] = seq
            self._segments.append(segment)
            self.bytes += segment.size
        # After a clean shutdown no segment is left: the numbering goes on from the checkpoint, or requests
        # of this run would number below it and not be replayed after a crash.
        self.next_seq = max(self.next_seq, self.checkpoint)
        if replay.corrupt:
            log.warning("%s: skipped %d damaged or truncated records", self.directory, replay.corrupt)
        return replay

    def count_replayed(self, spans: int) -> None:
        self._replayed.inc(spans)

    def start(self) -> None:
        """Start the checkpoints and, unless `fsync: never`, the syncing."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._checkpoint_loop(), name="wal checkpoints"))
        if self.config.fsync != "never":
            self._tasks.append(loop.create_task(self._sync_loop(), name="wal fsync"))

    # -- appending ----------------------------------------------------------------------------------------

    def append_request(self, body: bytes, force: bool = False) -> int:
        """Log one accepted request (an encoded ExportTraceServiceRequest); its seq. WALError when the log
        is full (unless `force`: spans accepted before, which must not be refused) or cannot be written:
        then nothing of the request may be buffered."""
        if self.bytes >= self.config.max_bytes and not force:
            raise WALError("the write-ahead log is full; retry later")
        if self._journal:
            self._write_decisions()
        seq = self.next_seq
        self._write(REQUEST, seq, body)
        self.next_seq = seq + 1
        return seq

    def append_forwarded(self, seq: int, trace_ids: Sequence[bytes]) -> None:
        """Log that request `seq`'s spans of `trace_ids` were queued for other members, so that its replay
        leaves them out. Without it (a crash first, or a write error, counted) a replay buffers them here
        as well, and hands them over."""
        with contextlib.suppress(WALError):
            self._write(FORWARDED, seq, b"".join(trace_ids))

    def append_handed_over(self, trace_ids: Sequence[bytes]) -> None:
        """Log that the traces of `trace_ids`, with every span logged so far, were handed to other members
        (as `append_forwarded`, for all the requests logged before)."""
        if self.next_seq:
            with contextlib.suppress(WALError):
                self._write(HANDED_OVER, self.next_seq - 1, b"".join(trace_ids))

    def _write_decisions(self) -> None:
        decided = list(self._journal)
        # Numbered as the request before them (0 when none was logged yet).
        segment = self._write(DECISIONS, max(self.next_seq - 1, 0), encode_decisions(decided))
        # Only once written: after a failed write they are written with the next record.
        del self._journal[: len(decided)]
        segment.kept.extend(trace_id for trace_id, how in decided if how is not None)

    def _write(self, kind: int, seq: int, body: bytes) -> Segment:
        """Append a record; the segment it went to (closed for writing if it is full now)."""
        checked = _CHECKED.pack(kind, seq)
        crc = zlib.crc32(body, zlib.crc32(checked))
        header = HEADER.pack(MAGIC, len(body) + _CHECKED.size, crc, kind, seq)
        size = HEADER.size + len(body)
        segment = self._active or self._new_segment()
        try:
            written = os.writev(segment.fd, [header, body])
            if written != size:
                raise OSError(0, "short write (disk full?)")
        except OSError as error:
            self._write_errors.inc()
            self._close_torn(segment)
            raise WALError(f"cannot write the write-ahead log {segment.path}: {error.strerror}") from None
        segment.size += size
        segment.max_seq = max(segment.max_seq, seq)
        self.bytes += size
        if self.config.fsync != "never":
            self._written.set()
        if segment.size >= self._segment_bytes:
            self._close_for_writing(segment)
        return segment

    def _new_segment(self) -> Segment:
        number = self._next_number
        self._next_number += 1
        segment = Segment(number, self.directory / f"{number:012d}{SEGMENT_SUFFIX}")
        try:
            segment.fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            self._write_errors.inc()
            raise WALError(f"cannot create {segment.path}: {error.strerror}") from None
        self._segments.append(segment)
        self._active = segment
        return segment

    def _close_for_writing(self, segment: Segment) -> None:
        if segment.fd >= 0:
            if self.config.fsync != "never":
                self._unsynced.append(segment.fd)  # the syncer closes it after its last fsync
            else:
                os.close(segment.fd)
            segment.fd = -1
        if self._active is segment:
            self._active = None

    def _close_torn(self, segment: Segment) -> None:
        """After a failed write: no more appends to `segment`, whose torn tail a restart skips."""
        with contextlib.suppress(OSError):
            size = os.fstat(segment.fd).st_size
            self.bytes += size - segment.size  # what a short write left on disk counts, and is freed
            segment.size = size
        self._close_for_writing(segment)

    # -- syncing ------------------------------------------------------------------------------------------

    async def synced(self, seq: int) -> None:
        """With `fsync: always`, return once the record `seq` is on disk; at once otherwise. WALError when
        the fsync failed (the record was written: see Ingest.committed)."""
        if self.config.fsync != "always" or seq <= self._synced_seq or not self._tasks:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._sync_waiters.append((seq, waiter))
        await waiter

    async def _sync_loop(self) -> None:
        """fsync what was written, in a worker thread: requests arriving during one fsync share the next."""
        interval = BATCH_FSYNC_INTERVAL if self.config.fsync == "batch" else 0.0
        while True:
            await self._written.wait()
            self._written.clear()
            if not await self._sync_once():
                self._written.set()  # tried again after a pause
                await asyncio.sleep(SYNC_RETRY_INTERVAL)
            elif interval:
                await asyncio.sleep(interval)

    async def _sync_once(self) -> bool:
        """One fsync of what was written; False when it could not be tried now (no file descriptor left to
        duplicate the segment's with)."""
        through = self.next_seq - 1
        fds = self._unsynced
        self._unsynced = []
        try:
            # Duplicates, closed by fsync_all: the segment may be closed for writing meanwhile.
            if self._active is not None:
                fds.append(os.dup(self._active.fd))
            if self._dir_fd >= 0:
                fds.append(os.dup(self._dir_fd))
        except OSError as error:
            self._unsynced = fds + self._unsynced
            log.warning("cannot fsync the write-ahead log in %s now: %s", self.directory, error.strerror)
            return False
        try:
            await asyncio.to_thread(fsync_all, fds)
        except OSError as error:
            self._write_errors.inc()
            log.warning("cannot fsync the write-ahead log in %s: %s", self.directory, error.strerror)
            for _, waiter in self._sync_waiters:
                if not waiter.done():
                    waiter.set_exception(WALError(f"cannot fsync the write-ahead log: {error.strerror}"))
            self._sync_waiters.clear()
            return True
        self._synced_seq = max(self._synced_seq, through)
        waiting = []
        for seq, waiter in self._sync_waiters:
            if seq <= through:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((seq, waiter))
        self._sync_waiters = waiting
        return True

    # -- checkpoints --------------------------------------------------------------------------------------

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.checkpoint_interval)
            try:
                self.advance()
            except Exception:
                log.exception("write-ahead log checkpoint failed")

    def undecided_bound(self) -> int:
        """The seq below which every logged request is decided: the oldest buffered trace's first request."""
        oldest = next(iter(self.buffer.traces.values()), None)
        return self.next_seq if oldest is None else min(oldest.first_seq, self.next_seq)

    def advance(self) -> None:
        """Note a checkpoint candidate; write the newest one the exporters have settled past, delete the
        segments wholly below it."""
        if self._journal:
            self._write_decisions_safely()
        marks = [exporter.export_mark() for exporter in self.exporters]
        self._pending.append((self.undecided_bound(), marks))
        settled = [exporter.settled_mark() for exporter in self.exporters]
        bound = None
        while self._pending and all(s >= m for s, m in zip(settled, self._pending[0][1], strict=True)):
            bound = self._pending.popleft()[0]
        if bound is not None and bound > self.checkpoint:
            self._write_checkpoint(bound)
            self._delete_below(self.checkpoint)
        elif not self._swept:
            # Once after a start: segments a crash left between writing a checkpoint and deleting what it
            # passed. Not every round: carried decisions are written below the checkpoint, and would be
            # deleted and written again in each.
            self._delete_below(self.checkpoint)
        self._swept = True

    def _write_decisions_safely(self) -> None:
        try:
            self._write_decisions()
        except WALError as error:
            log.warning("%s", error)

    def _write_checkpoint(self, seq: int) -> None:
        packed = struct.pack(">Q", seq)
        data = packed + struct.pack(">I", zlib.crc32(packed))
        temporary = self.directory / f"{CHECKPOINT_NAME}.tmp"
        try:
            temporary.write_bytes(data)
            os.replace(temporary, self.directory / CHECKPOINT_NAME)
        except OSError as error:
            self._write_errors.inc()
            log.warning("cannot write the write-ahead log checkpoint: %s", error.strerror)
            return
        self.checkpoint = seq

    def _delete_below(self, seq: int, carry: bool = True) -> None:
        carried: list[tuple[bytes, Kept | None]] = []
        kept_cache = self.decisions.kept if carry else None
        while self._segments and self._segments[0] is not self._active and self._segments[0].max_seq < seq:
            segment = self._segments.popleft()
            if kept_cache is not None:
                still = [trace_id for trace_id in segment.kept if trace_id in kept_cache]
                carried += [(trace_id, kept_cache[trace_id]) for trace_id in still]
            self._close_for_writing(segment)
            try:
                segment.path.unlink(missing_ok=True)
            except OSError as error:
                log.warning("cannot delete %s: %s", segment.path, error.strerror)
            self.bytes -= segment.size
        if carried:
            self._journal.extend(carried)
            self._write_decisions_safely()

    # -- stop -------------------------------------------------------------------------------------------

    def stop_checkpoints(self) -> None:
        """At shutdown, before the buffer is emptied: traces taken out to be decided are no longer in it."""
        for task in self._tasks:
            if task.get_name() == "wal checkpoints":
                task.cancel()

    async def close(self) -> None:
        """Stop checkpointing; with everything decided and exported (after a clean shutdown), empty the log;
        sync and close it, release the lock."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._lock_fd < 0:
            return
        if self._journal:
            self._write_decisions_safely()
        if not self.buffer.traces and all(
            exporter.settled_mark() >= exporter.export_mark() for exporter in self.exporters
        ):
            self._write_checkpoint(self.next_seq)
            if self._active is not None:
                self._close_for_writing(self._active)
            self._delete_below(self.next_seq, carry=False)
        else:
            log.info("write-ahead log: %d bytes kept in %s for the next start", self.bytes, self.directory)
        if self.config.fsync != "never":
            await self._sync_once()
        if self._active is not None:
            self._close_for_writing(self._active)
        for fd in [*self._unsynced, self._dir_fd, self._lock_fd]:
            if fd >= 0:
                os.close(fd)
        self._unsynced = []
        self._dir_fd = self._lock_fd = -1
        self.decisions.journal = None
        for _, waiter in self._sync_waiters:
            if not waiter.done():
                waiter.set_result(None)


def replay_decisions(decisions: DecisionCache, replay: Replay) -> None:
    """Put the logged decisions back in the decision cache (without logging them again)."""
    journal, decisions.journal = decisions.journal, None
    try:
        for trace_id, how in replay.decisions:
            decisions.record(trace_id, how)
    finally:
        decisions.journal = journal
