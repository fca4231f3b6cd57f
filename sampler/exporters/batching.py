"""The batching core all exporters share: a bounded queue (in memory or on disk), batches sealed by size
or age, concurrent senders and the flush on shutdown. Exporters subclass `BatchingExporter`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass

from sampler.config import BatchConfig, SendingQueueConfig
from sampler.errors import ExportError
from sampler.exporters.queue import DiskQueue, Record, queue_directory
from sampler.logthrottle import LogThrottle
from sampler.metrics import Metrics
from sampler.otlp_wire import SpanGroup, encode_request

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Batch:
    """A sealed batch held in memory: its span groups, encoded when sent."""

    groups: list[SpanGroup]
    span_count: int
    # The exporter's export mark before the batch's first export call.
    after: int = 0

    def body(self) -> bytes | None:
        return encode_request(self.groups)


class BatchingExporter(ABC):
    """Collects span groups into batches and hands each, encoded once, to `send`.

    `export` only appends: a batch is sealed when it holds `send_batch_size` spans or `timeout`
    after its first span, whichever comes first; `num_consumers` tasks send sealed batches.
    Batches hold whole groups (traces), so one can exceed `send_batch_size` by its last group.

    With `sending_queue.storage: disk` a batch is encoded when sealed and stored as a record that is
    acknowledged only once delivered or given up on; what is left at shutdown or after a crash is sent
    after the next start, before anything new.
    """

    def __init__(
        self,
        name: str,
        batch: BatchConfig,
        metrics: Metrics,
        num_consumers: int | None = None,
        queue: SendingQueueConfig | None = None,
    ) -> None:
        self.name = name
        queue = queue or SendingQueueConfig()
        self._send_batch_size = batch.send_batch_size
        self._batch_timeout = batch.timeout
        # Spans batched, sealed or in flight at most (in memory); beyond it export() refuses.
        self.capacity = batch.queue_size
        self._store = None if queue.storage == "memory" else DiskQueue(queue_directory(queue, name), queue)
        # On disk, the bound is the store's max_bytes instead.
        self._span_limit = self.capacity if self._store is None else sys.maxsize
        self._backpressure = queue.when_full == "backpressure"
        # The queue refused spans for want of room, and nothing has left it since.
        self._full = False
        self._num_consumers = batch.num_consumers if num_consumers is None else num_consumers
        self._batch: list[SpanGroup] = []
        self._batch_spans = 0
        # Export calls so far; the count before the open batch's first one; the same for each batch in
        # memory not yet settled, in order (see export_mark, settled_mark).
        self._calls = 0
        self._open_after = 0
        self._unsettled: dict[int, None] = {}
        # Spans accepted and not yet delivered or given up on: batching, sealed, or in flight.
        self._pending_spans = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sealed: asyncio.Queue[Batch | Record] = asyncio.Queue()
        self._consumers: list[asyncio.Task[None]] = []
        self._closing = False
        # Set whenever spans leave the queue, for wait_for_room.
        self._room = asyncio.Event()
        self._exported = metrics.exported_spans.labels(name)
        self._failed = metrics.export_failed_spans.labels(name)
        self._dropped = metrics.export_dropped_spans.labels(name)
        self._retries = metrics.export_retries.labels(name)
        metrics.export_queue_spans.labels(name).set_function(lambda: self._pending_spans)
        if self._store is not None:
            store = self._store
            metrics.export_queue_bytes.labels(name).set_function(lambda: store.bytes)
        self._recovered = metrics.export_queue_recovered_batches.labels(name)
        self._corrupt = metrics.export_queue_corrupt_records.labels(name)
        self._drop_log = LogThrottle()
        self._failure_log = LogThrottle()
        self._partial_log = LogThrottle()

    @abstractmethod
    async def send(self, body: bytes, span_count: int) -> int:
        """Deliver one serialized ExportTraceServiceRequest; return how many spans it rejected.

        Raises ExportError when the batch as a whole was not delivered.
        """

    @abstractmethod
    async def open(self) -> None:
        """Acquire what `send` needs (a connection pool, a file); called once by `start`."""

    @abstractmethod
    async def close(self) -> None:
        """Release what `open` acquired; called once by `shutdown`, after the last send."""

    def export(self, groups: list[SpanGroup], span_count: int) -> None:
        # Called once per kept trace: constant work, no per-span loop, never awaits.
        self._calls += 1
        if (
            self._closing
            or self._pending_spans + span_count > self._span_limit
            or (self._full and self._store is not None)
        ):
            self._refuse(span_count, full=not self._closing)
            return
        if not span_count:
            return
        self._pending_spans += span_count
        if not self._batch_spans:
            self._open_after = self._calls - 1
        self._batch.extend(groups)
        self._batch_spans += span_count
        if self._batch_spans >= self._send_batch_size:
            self._seal()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._batch_timeout, self._seal)

    async def wait_for_room(self, span_count: int) -> None:
        """Wait until `span_count` more spans fit in the queue (or it is empty: they may never fit)."""
        while self._pending_spans and (
            self._pending_spans + span_count > self._span_limit or (self._full and self._store is not None)
        ):
            self._room.clear()
            await self._room.wait()

    def is_full(self) -> bool:
        """Whether ingest should be refused for this exporter: it refused kept spans for want of room
        (`batch.queue_size` spans in memory, `sending_queue.max_bytes` on disk), nothing has left its queue
        since, and `sending_queue.when_full` is backpressure. Cheap enough to ask per request."""
        return self._full and self._backpressure

    def export_mark(self) -> int:
        return self._calls

    def settled_mark(self) -> int:
        for after in self._unsettled:
            return after  # the oldest batch still held in memory
        return self._open_after if self._batch_spans else self._calls

    async def start(self) -> None:
        if self._store is not None:
            await self._recover(self._store)
        await self.open()
        self._consumers = [
            asyncio.create_task(self._consume(), name=f"exporter {self.name} sender {n}")
            for n in range(self._num_consumers)
        ]

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - the Exporter protocol
        self._closing = True
        self._seal()
        try:
            if self._consumers:
                async with asyncio.timeout(timeout):
                    await self._sealed.join()
        except TimeoutError:
            log.warning(
                "exporter %s: shutdown timed out after %.1fs with %d spans undelivered",
                self.name,
                timeout,
                self._pending_spans,
            )
        for task in self._consumers:
            task.cancel()
        # A cancelled sender counts its own in-flight batch as failed (in memory).
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers = []
        self._drop_unsent()
        if self._store is not None:
            await self._close_store(self._store)
        await self.close()

    def log_retry(self, failure: Exception, delay: float) -> None:
        """Record one retried send attempt (the `on_retry` of `with_retries`)."""
        log.debug("exporter %s: %s; retrying in %.2fs", self.name, failure, delay)
        self._retries.inc()

    def log_rejected(self, rejected: int, span_count: int, message: str) -> None:
        """Warn (rate-limited) that the downstream took a batch of `span_count` but rejected some spans."""
        if rejected > 0 and self._partial_log.allow():
            log.warning(
                "exporter %s: downstream rejected %d of %d spans: %s (%d similar messages suppressed)",
                self.name,
                rejected,
                span_count,
                message or "no message",
                self._partial_log.take_suppressed(),
            )

    async def _recover(self, store: DiskQueue) -> None:
        """Open the disk queue and queue what a previous run left in it, before anything new."""
        try:
            recovery = await store.open()
        except ExportError as error:
            raise ExportError(f"exporter {self.name}: {error}") from None
        self._recovered.inc(len(recovery.records))
        self._corrupt.inc(recovery.corrupt)
        for record in recovery.records:
            self._sealed.put_nowait(record)
            self._pending_spans += record.span_count
        if recovery.records or recovery.corrupt:
            log.info(
                "exporter %s: recovered %d batches (%d spans) from %s, skipped %d damaged records",
                self.name,
                len(recovery.records),
                recovery.spans,
                store.directory,
                recovery.corrupt,
            )
        # Spans exported before start wait in the open batch until the store is open.
        self._seal()

    def _drop_unsent(self) -> None:
        """After the senders stopped: what is in memory is lost (counted), what is on disk stays there."""
        while not self._sealed.empty():
            item = self._sealed.get_nowait()
            self._sealed.task_done()
            if isinstance(item, Batch):
                self._failed.inc(item.span_count)
            self._pending_spans -= item.span_count
        if self._batch_spans:  # never sealed: the disk queue was not opened
            self._failed.inc(self._batch_spans)
            self._pending_spans -= self._batch_spans
            self._batch, self._batch_spans = [], 0
        self._room.set()

    async def _close_store(self, store: DiskQueue) -> None:
        if store.unacked_records:
            log.info(
                "exporter %s: %d batches (%d spans) left in %s for the next start",
                self.name,
                store.unacked_records,
                store.unacked_spans,
                store.directory,
            )
        await store.close()

    def _refuse(self, span_count: int, full: bool) -> None:
        self._dropped.inc(span_count)
        # Room comes back only when something leaves the queue: an empty one is never full.
        if full and self._pending_spans:
            self._full = True
        if self._drop_log.allow():
            reason = f"queue full ({self._bound()})" if full else "shutting down"
            log.warning(
                "exporter %s: %s, dropped %d spans (%d more refusals not logged)",
                self.name,
                reason,
                span_count,
                self._drop_log.take_suppressed(),
            )

    def _log_failure(self, what: str, span_count: int, error: ExportError) -> None:
        if self._failure_log.allow():
            log.warning(
                "exporter %s: %s %d spans: %s (%d similar messages suppressed)",
                self.name,
                what,
                span_count,
                error,
                self._failure_log.take_suppressed(),
            )

    def _bound(self) -> str:
        if self._store is None:
            return f"{self.capacity} spans"
        return f"{self._store.max_bytes} bytes in {self._store.directory}"

    def _seal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch_spans:
            return
        if self._store is None:
            batch = Batch(self._batch, self._batch_spans, self._open_after)
            self._unsettled[batch.after] = None  # unique: each batch has its own export calls
            self._sealed.put_nowait(batch)
        elif self._store.is_open:
            self._store_batch(self._store, self._batch, self._batch_spans)
        else:
            return  # stored by start, after what the disk queue recovers
        self._batch = []
        self._batch_spans = 0

    def _store_batch(self, store: DiskQueue, groups: list[SpanGroup], span_count: int) -> None:
        try:
            record = store.append(encode_request(groups), span_count)
        except ExportError as error:
            self._pending_spans -= span_count
            self._dropped.inc(span_count)
            self._log_failure("could not queue", span_count, error)
            return
        if record is None:
            self._pending_spans -= span_count
            self._refuse(span_count, full=True)
            return
        self._sealed.put_nowait(record)

    async def _consume(self) -> None:
        while True:
            item = await self._sealed.get()
            try:
                await self._deliver(item)
                self._settle(item)
            finally:
                self._pending_spans -= item.span_count
                self._room.set()
                self._sealed.task_done()

    def _settle(self, item: Batch | Record) -> None:
        """Release what a batch delivered or given up on held: its room, its record on disk."""
        if isinstance(item, Batch):
            self._unsettled.pop(item.after, None)
        if isinstance(item, Batch) or (self._store is not None and self._store.ack(item)):
            self._full = False

    async def _deliver(self, item: Batch | Record) -> None:
        span_count = item.span_count
        body = item.body()
        if body is None:
            self._failed.inc(span_count)
            self._corrupt.inc()
            log.warning("exporter %s: a queued batch of %d spans is damaged on disk", self.name, span_count)
            return
        try:
            rejected = await self.send(body, span_count)
        except asyncio.CancelledError:
            if isinstance(item, Batch):
                self._failed.inc(span_count)
            raise
        except ExportError as error:
            self._failed.inc(span_count)
            self._log_failure("failed to export", span_count, error)
            return
        except Exception:
            # A bug in one send must not kill the sender task and stall every later batch.
            self._failed.inc(span_count)
            log.exception("exporter %s: unexpected error exporting %d spans", self.name, span_count)
            return
        rejected = min(max(rejected, 0), span_count)
        if rejected:
            self._failed.inc(rejected)
        self._exported.inc(span_count - rejected)
