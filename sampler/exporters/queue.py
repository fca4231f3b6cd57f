"""The persistent sending queue (`sending_queue.storage: disk`): sealed batches as CRC-checked records in
segment files that survive a restart, each acknowledged once delivered or given up on, one directory and
one lock per exporter."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import msgpack

from sampler.config import SendingQueueConfig
from sampler.errors import ConfigError, ExportError

log = logging.getLogger(__name__)

# A record: MAGIC, the payload's length and CRC32 (big-endian), then the payload, msgpack
# [span_count, body]. A segment is only appended to, and never again once a write failed or the gateway
# restarted: a torn record is its last.
MAGIC = b"TGq\x01"
HEADER = struct.Struct(">4sII")
# An acknowledged record, appended to its segment's ack file: the record's offset in the segment.
ACK = struct.Struct(">Q")
SEGMENT_SUFFIX = ".seg"
ACK_SUFFIX = ".ack"
LOCK_NAME = "lock"
_SEGMENT_NAME = re.compile(r"^(\d{12})\.seg$")
# A segment is closed for writing at max_bytes / 8 (at most this): a partly acknowledged segment holds
# its delivered records on disk until its last one is settled.
MAX_SEGMENT_BYTES = 16 << 20
# fsync: batch syncs the segments written to at most this often.
BATCH_FSYNC_INTERVAL = 0.1


def encode_record(body: bytes, span_count: int) -> tuple[bytes, bytes]:
    """The header and payload of one record holding an encoded ExportTraceServiceRequest."""
    payload: bytes = msgpack.packb([span_count, body], use_bin_type=True)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)), payload


def _header(data: bytes | memoryview, offset: int) -> tuple[int, int] | None:
    """(end, payload CRC) of the record at `offset` by its header; None unless the header holds: MAGIC,
    and a length within `data`."""
    if len(data) - offset < HEADER.size:
        return None
    magic, length, crc = HEADER.unpack_from(data, offset)
    end: int = offset + HEADER.size + length
    if magic != MAGIC or end > len(data):
        return None
    return end, crc


def decode_record(data: bytes | memoryview, offset: int = 0) -> tuple[int, int, bytes] | None:
    """(size, span count, body) of the record at `offset`; None if it is damaged or cut short."""
    header = _header(data, offset)
    if header is None:
        return None
    end, crc = header
    payload = data[offset + HEADER.size : end]
    if zlib.crc32(payload) != crc:
        return None
    try:
        span_count, body = msgpack.unpackb(payload, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    if not isinstance(span_count, int) or span_count < 0 or not isinstance(body, bytes):
        return None
    return end - offset, span_count, body


def scan_records(data: bytes) -> tuple[list[tuple[int, int, int]], int]:
    """The sound records of a segment as (offset, size, span count), and how many damaged places were
    skipped. A record whose header holds but whose payload does not (a bad CRC) is stepped over by its
    length when a record or the segment's end follows it. Anything else ends the scan: a torn tail (a
    crash mid-write), or a damaged header. The scan never looks for the next MAGIC inside a record's
    bytes, where a client's span may have put a whole record of its making."""
    memory = memoryview(data)
    records: list[tuple[int, int, int]] = []
    damaged = 0
    offset = 0
    while offset < len(data):
        decoded = decode_record(memory, offset)
        if decoded is None:
            damaged += 1
            end = _claimed_end(data, offset)
            if end is None:
                break
            offset = end
            continue
        size, span_count, _ = decoded
        records.append((offset, size, span_count))
        offset += size
    return records, damaged


def _claimed_end(data: bytes, offset: int) -> int | None:
    """Where the damaged record at `offset` ends by its header, if that header holds and its length
    reaches a record's MAGIC or the segment's end. None otherwise."""
    header = _header(data, offset)
    if header is None or (header[0] < len(data) and not data.startswith(MAGIC, header[0])):
        return None
    return header[0]


def lock_directory(directory: Path, what: str) -> int:
    """Take the exclusive lock of a directory one gateway writes (its `lock` file, holding our pid); the
    lock's descriptor. ExportError naming the holder when another process has it."""
    path = directory / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ExportError(
            f"{what} directory {directory} is in use by another gateway "
            f"(lock file {path} held by pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def fsync_all(fds: list[int]) -> None:
    """fsync and close each of `fds` (duplicates the queue handed over); raises the first failure."""
    failure: OSError | None = None
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as error:
            failure = failure or error
        finally:
            os.close(fd)
    if failure is not None:
        raise failure


@dataclass(eq=False)
class Segment:
    """One segment file and what is known of it: its size, its records not yet acknowledged."""

    seq: int
    path: Path
    size: int = 0
    ack_size: int = 0
    unacked: int = 0
    # Open for appending while this is the segment being written.
    fd: int = -1

    @property
    def ack_path(self) -> Path:
        return self.path.with_suffix(ACK_SUFFIX)

    def read(self, offset: int, size: int) -> bytes | None:
        """The body of the record at `offset`; None if it cannot be read back sound."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                data = os.pread(fd, size, offset)
            finally:
                os.close(fd)
        except OSError:
            return None
        decoded = decode_record(data)
        return None if decoded is None else decoded[2]


@dataclass(slots=True, eq=False)
class Record:
    """A batch stored in a segment, waiting to be delivered."""

    segment: Segment
    offset: int
    size: int
    span_count: int

    def body(self) -> bytes | None:
        """The encoded ExportTraceServiceRequest; None if the record was damaged on disk."""
        return self.segment.read(self.offset, self.size)


@dataclass
class Recovery:
    """What `DiskQueue.open` found: the records still to deliver, in order, and the damaged places skipped."""

    records: list[Record] = field(default_factory=list)
    corrupt: int = 0

    @property
    def spans(self) -> int:
        return sum(record.span_count for record in self.records)


def queue_directory(config: SendingQueueConfig, exporter: str) -> Path:
    """The exporter's own directory under `sending_queue.directory` (its name, `/` escaped)."""
    if not config.directory:
        raise ConfigError(f"exporters.{exporter}.sending_queue.directory: required when storage is disk")
    return Path(config.directory) / quote(exporter, safe="")


class DiskQueue:
    """Sealed batches in segment files under one directory, appended in order, acknowledged in any order.

    `open` takes the directory's lock and recovers what a previous run left; `append` stores a batch
    (None when `max_bytes` would be exceeded); `ack` forgets one, deleting its segment once every record
    in it is acknowledged. Records written are fsynced per `fsync` in a worker thread.
    """

    def __init__(self, directory: Path, config: SendingQueueConfig) -> None:
        self.directory = directory
        self.max_bytes = config.max_bytes
        self.fsync = config.fsync
        self.segment_bytes = max(1, min(MAX_SEGMENT_BYTES, config.max_bytes // 8))
        # Segment and ack files on disk, as the queue wrote or found them.
        self.bytes = 0
        self.unacked_records = 0
        self.unacked_spans = 0
        self._segments: dict[int, Segment] = {}
        self._active: Segment | None = None
        self._next_seq = 0
        self._lock_fd = -1
        self._dir_fd = -1
        # Duplicates of the descriptors written to since the last fsync, for the sync thread to own.
        self._unsynced: dict[int, int] = {}
        self._dir_unsynced = False
        self._written = asyncio.Event()
        self._syncer: asyncio.Task[None] | None = None

    @property
    def is_open(self) -> bool:
        return self._lock_fd >= 0

    async def open(self) -> Recovery:
        """Lock the directory and recover its segments (in a worker thread: it reads them all)."""
        recovery = await asyncio.to_thread(self._open)
        if self.fsync != "never":
            interval = BATCH_FSYNC_INTERVAL if self.fsync == "batch" else 0.0
            self._syncer = asyncio.create_task(self._sync_loop(interval), name=f"fsync {self.directory}")
        return recovery

    def append(self, body: bytes, span_count: int) -> Record | None:
        """Store one batch; None when it does not fit in `max_bytes`. ExportError if the write fails."""
        header, payload = encode_record(body, span_count)
        size = len(header) + len(payload)
        if self.bytes + size > self.max_bytes:
            return None
        segment = self._active or self._new_segment()
        try:
            written = os.writev(segment.fd, [header, payload])
        except OSError as error:
            self._close_torn(segment)
            raise ExportError(f"cannot write {segment.path}: {error.strerror}") from None
        if written != size:
            self._close_torn(segment)
            raise ExportError(f"cannot write {segment.path}: short write (disk full?)")
        record = Record(segment, segment.size, size, span_count)
        segment.size += size
        segment.unacked += 1
        self.bytes += size
        self.unacked_records += 1
        self.unacked_spans += span_count
        self._mark_unsynced(segment)
        if segment.size >= self.segment_bytes:
            self._close_for_writing(segment)
        return record

    def ack(self, record: Record) -> bool:
        """Forget a delivered (or given up) record; True when that freed disk space."""
        segment = record.segment
        segment.unacked -= 1
        self.unacked_records -= 1
        self.unacked_spans -= record.span_count
        if segment.unacked == 0:
            self._delete(segment)
            return True
        try:
            fd = os.open(segment.ack_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, ACK.pack(record.offset))
            finally:
                os.close(fd)
        except OSError as error:
            # Only a restart would notice: it sends the record again.
            log.warning("cannot write %s: %s", segment.ack_path, error.strerror)
            return False
        segment.ack_size += ACK.size
        self.bytes += ACK.size
        return False

    async def close(self) -> None:
        """Sync what was written (unless `fsync: never`), close every file and release the lock."""
        if self._syncer is not None:
            self._syncer.cancel()
            await asyncio.gather(self._syncer, return_exceptions=True)
            self._syncer = None
        if self.is_open and self.fsync != "never":
            try:
                await asyncio.to_thread(fsync_all, self._take_unsynced())
            except OSError as error:
                log.warning("cannot fsync %s: %s", self.directory, error.strerror)
        if self._active is not None:
            self._close_for_writing(self._active)
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._lock_fd = -1

    def _open(self) -> Recovery:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = lock_directory(self.directory, "queue")
            self._dir_fd = os.open(self.directory, os.O_RDONLY)
            return self._recover()
        except OSError as error:
            raise ExportError(f"cannot use queue directory {self.directory}: {error}") from None

    def _recover(self) -> Recovery:
        recovery = Recovery()
        for path in sorted(self.directory.iterdir()):
            match = _SEGMENT_NAME.match(path.name)
            if match is not None:
                seq = int(match.group(1))
                self._next_seq = max(self._next_seq, seq + 1)
                recovery.corrupt += self._recover_segment(Segment(seq, path), recovery.records)
            elif path.suffix == ACK_SUFFIX and not path.with_suffix(SEGMENT_SUFFIX).exists():
                path.unlink(missing_ok=True)  # its segment was deleted just before a crash
        return recovery

    def _recover_segment(self, segment: Segment, records: list[Record]) -> int:
        """Queue the unacknowledged records of `segment` (or delete it if none); returns damaged places."""
        data = segment.path.read_bytes()
        try:
            acks = segment.ack_path.read_bytes()
        except FileNotFoundError:
            acks = b""
        acked = {offset for (offset,) in ACK.iter_unpack(acks[: len(acks) - len(acks) % ACK.size])}
        found, damaged = scan_records(data)
        live = [Record(segment, offset, size, spans) for offset, size, spans in found if offset not in acked]
        if damaged:
            log.warning("%s: skipped %d damaged or truncated records", segment.path, damaged)
        if not live:
            self._unlink(segment)
            return damaged
        segment.size, segment.ack_size, segment.unacked = len(data), len(acks), len(live)
        self._segments[segment.seq] = segment
        self.bytes += segment.size + segment.ack_size
        self.unacked_records += len(live)
        self.unacked_spans += sum(record.span_count for record in live)
        records.extend(live)
        return damaged

    def _new_segment(self) -> Segment:
        seq = self._next_seq
        self._next_seq += 1
        segment = Segment(seq, self.directory / f"{seq:012d}{SEGMENT_SUFFIX}")
        try:
            segment.fd = os.open(segment.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            raise ExportError(f"cannot create {segment.path}: {error.strerror}") from None
        self._segments[seq] = segment
        self._active = segment
        self._dir_unsynced = True
        return segment

    def _close_for_writing(self, segment: Segment) -> None:
        if segment.fd >= 0:
            os.close(segment.fd)
            segment.fd = -1
        if self._active is segment:
            self._active = None

    def _close_torn(self, segment: Segment) -> None:
        """After a failed write: no more appends to `segment`, whose tail a restart will skip."""
        try:
            torn = os.fstat(segment.fd).st_size - segment.size
        except OSError:
            torn = 0
        segment.size += torn
        self.bytes += torn
        self._close_for_writing(segment)
        if segment.unacked == 0:
            self._delete(segment)

    def _delete(self, segment: Segment) -> None:
        self._close_for_writing(segment)
        unsynced = self._unsynced.pop(segment.seq, -1)
        if unsynced >= 0:
            os.close(unsynced)
        del self._segments[segment.seq]
        self.bytes -= segment.size + segment.ack_size
        self._unlink(segment)

    def _unlink(self, segment: Segment) -> None:
        # The segment first: an ack file without its segment is removed at the next start, while a
        # segment without its ack file would be sent again.
        try:
            segment.path.unlink(missing_ok=True)
            segment.ack_path.unlink(missing_ok=True)
        except OSError as error:
            log.warning("cannot delete %s: %s", segment.path, error.strerror)

    def _mark_unsynced(self, segment: Segment) -> None:
        if self.fsync == "never":
            return
        if segment.seq not in self._unsynced:
            self._unsynced[segment.seq] = os.dup(segment.fd)
        self._written.set()

    def _take_unsynced(self) -> list[int]:
        fds = list(self._unsynced.values())
        self._unsynced.clear()
        if self._dir_unsynced and self._dir_fd >= 0:
            fds.append(os.dup(self._dir_fd))
            self._dir_unsynced = False
        return fds

    async def _sync_loop(self, interval: float) -> None:
        """fsync what was written, in a worker thread: at once (`always`), or at most every `interval`."""
        while True:
            await self._written.wait()
            self._written.clear()
            try:
                await asyncio.to_thread(fsync_all, self._take_unsynced())
            except OSError as error:
                log.warning("cannot fsync %s: %s", self.directory, error.strerror)
            if interval:
                await asyncio.sleep(interval)
