"""The batching core all exporters share: a bounded queue, batches sealed by size or age,
concurrent senders and the flush on shutdown. Exporters subclass `BatchingExporter`.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod

from sampler.config import BatchConfig
from sampler.errors import ExportError
from sampler.logthrottle import LogThrottle
from sampler.metrics import Metrics
from sampler.otlp_wire import SpanGroup, encode_request

log = logging.getLogger(__name__)

# A sealed batch: its span groups and their span count.
Batch = tuple[list[SpanGroup], int]


class BatchingExporter(ABC):
    """Collects span groups into batches and hands each, encoded once, to `send`.

    `export` only appends: a batch is sealed when it holds `send_batch_size` spans or `timeout`
    after its first span, whichever comes first; `num_consumers` tasks send sealed batches.
    Batches hold whole groups (traces), so one can exceed `send_batch_size` by its last group.
    """

    def __init__(
        self, name: str, batch: BatchConfig, metrics: Metrics, num_consumers: int | None = None
    ) -> None:
        self.name = name
        self._send_batch_size = batch.send_batch_size
        self._batch_timeout = batch.timeout
        # Spans batched, sealed or in flight at most; beyond it export() refuses.
        self.capacity = batch.queue_size
        self._num_consumers = batch.num_consumers if num_consumers is None else num_consumers
        self._batch: list[SpanGroup] = []
        self._batch_spans = 0
        # Spans accepted and not yet delivered or given up on: batching, sealed, or in flight.
        self._pending_spans = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sealed: asyncio.Queue[Batch] = asyncio.Queue()
        self._consumers: list[asyncio.Task[None]] = []
        self._closing = False
        # Set whenever spans leave the queue, for wait_for_room.
        self._room = asyncio.Event()
        self._exported = metrics.exported_spans.labels(name)
        self._failed = metrics.export_failed_spans.labels(name)
        self._dropped = metrics.export_dropped_spans.labels(name)
        self._retries = metrics.export_retries.labels(name)
        metrics.export_queue_spans.labels(name).set_function(lambda: self._pending_spans)
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
        if self._closing or self._pending_spans + span_count > self.capacity:
            self._refuse(span_count)
            return
        if not span_count:
            return
        self._pending_spans += span_count
        self._batch.extend(groups)
        self._batch_spans += span_count
        if self._batch_spans >= self._send_batch_size:
            self._seal()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._batch_timeout, self._seal)

    async def wait_for_room(self, span_count: int) -> None:
        """Wait until `span_count` more spans fit in the queue (or it is empty: they may never fit)."""
        while self._pending_spans and self._pending_spans + span_count > self.capacity:
            self._room.clear()
            await self._room.wait()

    async def start(self) -> None:
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
        # A cancelled sender counts its own in-flight batch as failed.
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers = []
        while not self._sealed.empty():
            _, span_count = self._sealed.get_nowait()
            self._sealed.task_done()
            self._failed.inc(span_count)
            self._pending_spans -= span_count
            self._room.set()
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

    def _refuse(self, span_count: int) -> None:
        self._dropped.inc(span_count)
        if self._drop_log.allow():
            reason = "shutting down" if self._closing else f"queue full ({self.capacity} spans)"
            log.warning(
                "exporter %s: %s, dropped %d spans (%d more refusals not logged)",
                self.name,
                reason,
                span_count,
                self._drop_log.take_suppressed(),
            )

    def _seal(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._batch_spans:
            return
        self._sealed.put_nowait((self._batch, self._batch_spans))
        self._batch = []
        self._batch_spans = 0

    async def _consume(self) -> None:
        while True:
            groups, span_count = await self._sealed.get()
            try:
                await self._deliver(groups, span_count)
            finally:
                self._pending_spans -= span_count
                self._room.set()
                self._sealed.task_done()

    async def _deliver(self, groups: list[SpanGroup], span_count: int) -> None:
        try:
            rejected = await self.send(encode_request(groups), span_count)
        except asyncio.CancelledError:
            self._failed.inc(span_count)
            raise
        except ExportError as error:
            self._failed.inc(span_count)
            if self._failure_log.allow():
                log.warning(
                    "exporter %s: failed to export %d spans: %s (%d similar messages suppressed)",
                    self.name,
                    span_count,
                    error,
                    self._failure_log.take_suppressed(),
                )
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
