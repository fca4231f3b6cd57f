"""Retries with exponential backoff and jitter, as the OTel Collector's `retry_on_failure`."""

from __future__ import annotations

import asyncio
import random
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sampler.config import RetryConfig, SendingExporterConfig
from sampler.errors import ExportError
from sampler.exporters.batching import BatchingExporter
from sampler.metrics import Metrics

# Backoff jitter as in the OTel Collector: each wait is the interval ±50%.
JITTER = 0.5

T = TypeVar("T")


class Retryable(Exception):
    """One attempt failed in a way worth retrying; `delay` is the server's requested wait, if any."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    retry: RetryConfig,
    on_retry: Callable[[Retryable, float], None],
) -> T:
    """Run `attempt` until it returns, retrying on Retryable; ExportError once retrying is over.

    A server-requested delay (Retry-After, gRPC RetryInfo) replaces the backoff interval for that wait.
    `on_retry(failure, delay)` is called before each wait.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    interval = retry.initial_interval
    while True:
        try:
            return await attempt()
        except Retryable as failure:
            if not retry.enabled:
                raise ExportError(f"{failure} (retries disabled)") from None
            if failure.delay is not None:
                delay = failure.delay
            else:
                delay = min(retry.max_interval, interval * random.uniform(1 - JITTER, 1 + JITTER))
            interval = min(retry.max_interval, interval * retry.multiplier)
            elapsed = loop.time() - started
            # max_elapsed_time 0 retries forever, as in the OTel Collector.
            if retry.max_elapsed_time and elapsed + delay > retry.max_elapsed_time:
                raise ExportError(
                    f"{failure}; giving up after {elapsed:.1f}s "
                    f"(max_elapsed_time {retry.max_elapsed_time:g}s)"
                ) from None
            on_retry(failure, delay)
            await asyncio.sleep(delay)


class RetryingExporter(BatchingExporter):
    """A BatchingExporter that sends each batch over the network, retrying per `retry_on_failure`.

    Subclasses turn the encoded OTLP batch into their request body once (`encode`) and make one
    attempt to deliver it (`attempt`), raising Retryable or ExportError when it fails. A batch given up
    on is counted failed, also from a disk queue (which then forgets it): with `max_elapsed_time: 0` a
    disk queue holds each batch until it is delivered or refused for good.
    """

    def __init__(self, name: str, config: SendingExporterConfig, metrics: Metrics) -> None:
        super().__init__(name, config.batch, metrics, queue=config.sending_queue)
        self._retry = config.retry_on_failure

    async def send(self, body: bytes, span_count: int) -> int:
        payload = await self.encode(body)
        return await with_retries(lambda: self.attempt(payload, span_count), self._retry, self.log_retry)

    async def encode(self, body: bytes) -> bytes:
        """The request body for a serialized ExportTraceServiceRequest; as is by default."""
        return body

    @abstractmethod
    async def attempt(self, payload: bytes, span_count: int) -> int:
        """Deliver `payload` once; return how many spans the server rejected."""
