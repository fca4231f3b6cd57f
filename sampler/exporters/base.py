"""The Exporter protocol the decider hands kept traces to."""

from __future__ import annotations

from typing import Protocol

from sampler.otlp_wire import SpanGroup


class Exporter(Protocol):
    """A downstream destination for kept spans."""

    name: str
    # Spans the exporter's queue holds at most (batched and in flight).
    capacity: int

    def export(self, groups: list[SpanGroup], span_count: int) -> None:
        """Queue spans for sending; returns at once and never blocks the event loop.

        When the exporter's queue is full the spans are refused and counted, never silently lost.
        """
        ...

    async def wait_for_room(self, span_count: int) -> None:
        """Return once `span_count` more spans would be accepted (or the queue is empty)."""
        ...

    def export_mark(self) -> int:
        """A mark of everything handed to `export` so far (the write-ahead log's checkpoints compare them)."""
        ...

    def settled_mark(self) -> int:
        """Everything exported up to this mark is settled: delivered, given up on, or in a disk queue."""
        ...

    async def start(self) -> None:
        """Open connections and start background senders."""
        ...

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - a deadline in seconds is the contract
        """Flush everything queued, giving up (and counting the loss) after `timeout` seconds."""
        ...
