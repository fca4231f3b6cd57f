"""Bounded memory (`memory:`): the memory estimate, stress relief, and the overload flag receivers read.

Above `stress_relief.activation_level` of `max_memory` the gateway sheds load (new traces decided at once by
trace-id hash, buffered ones early); above `max_memory` with the exporters full, receivers refuse requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import time
from collections.abc import Callable, Sequence
from typing import Any

from policies.base import Decision, Policy
from policies.probabilistic import Probabilistic, ProbabilisticParams
from sampler.buffer import DecisionCache, Trace, TraceBuffer
from sampler.config import Config, SendingExporterConfig, TailSamplingConfig
from sampler.decider import Decider, DecisionObserver
from sampler.exporters.base import Exporter
from sampler.metrics import Metrics

log = logging.getLogger(__name__)

# Resident bytes a buffered trace costs (measured, CPython 3.11 on 64-bit Linux): 1.21 × its serialized
# span bytes, plus about 460 bytes for the trace itself (its object, table and deadline-queue entries).
# Over traces of 1 to 100 spans of 60 to 400 bytes this came to 0.99-1.29 × the RSS they added.
BYTES_OVERHEAD = 1.21
TRACE_OVERHEAD = 460
# The monitor also runs on this timer, so that shedding resumes when exporters drain with no request coming.
TICK = 0.05
# The process RSS is read at most this often.
RSS_INTERVAL = 0.1
# Spans decided early per round of shedding, between checks of the estimate and of the exporters, and
# rounds per update: what is left waits for the next request or tick, so the event loop never stalls long.
SHED_SLICE = 1000
SHED_ROUNDS = 8
# The name stress-relief decisions carry as `tailsampling.policy` and in the policy metrics.
STRESS_POLICY = "stress_relief"
_MIB = 1 << 20


def read_rss() -> int:
    """The process's resident set size in bytes (/proc/self/statm); 0 where that cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * mmap.PAGESIZE
    except (OSError, IndexError, ValueError):
        return 0


class Pressure:
    """What receivers read of memory pressure: whether to refuse new requests, and the retry delay to
    suggest. This one never refuses: it stands in when `memory.max_memory` is not set."""

    def __init__(self, retry_after: float = 1.0) -> None:
        self.overloaded = False
        self.retry_after = retry_after

    def update(self) -> None:
        """Called after each request's spans are buffered."""

    def start(self) -> None:
        """Begin watching (on the running event loop)."""

    async def stop(self) -> None:
        """Stop watching; called once receivers have stopped."""

    def reconfigure(self, settings: TailSamplingConfig) -> None:
        """Follow a reloaded `tail_sampling` block where it applies here."""


class ExporterQueue:
    """What the monitor reads of one exporter: whether it can take more kept spans, and the spans its
    queue holds in memory."""

    def __init__(self, exporter: Exporter, in_memory: bool) -> None:
        self.exporter = exporter
        self.in_memory = in_memory
        self._is_full: Callable[[], bool] | None = getattr(exporter, "is_full", None)

    def queued_spans(self) -> int:
        """Spans batched, sealed or in flight (BatchingExporter's count); 0 for an exporter without one."""
        return int(getattr(self.exporter, "_pending_spans", 0))

    def is_full(self) -> bool:
        """The exporter's own `is_full()`; for one without it, its queue within 5 % of `capacity` spans
        (whole traces are refused, so a queue seldom fills to the last span)."""
        if self._is_full is not None:
            return self._is_full()
        capacity = self.exporter.capacity
        return self.queued_spans() >= capacity - capacity // 20


class MemoryPressure(Pressure):
    """Keeps the memory estimate under `max_memory`: stress relief, shedding, and the overload flag.

    The estimate is buffered bytes × BYTES_OVERHEAD + buffered traces × TRACE_OVERHEAD + the spans the
    exporters queue in memory (at the buffer's mean span size). Once the estimate reaches the deactivation
    level, the process RSS above its level at start counts too, whichever is larger; below it RSS is left
    out, because the allocator keeps memory it has freed and RSS would hold stress relief on long after the
    spans are gone.

    Shedding hands kept traces to the exporters, so it waits while an exporter is full (what it refused
    would be lost): memory then rises to `max_memory` and receivers push back until the exporters drain.
    """

    def __init__(
        self,
        config: Config,
        buffer: TraceBuffer,
        exporters: Sequence[Exporter],
        decisions: DecisionCache,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        rss: Callable[[], int] = read_rss,
    ) -> None:
        memory = config.memory
        super().__init__(memory.retry_after)
        if memory.max_memory is None:
            raise ValueError("MemoryPressure needs memory.max_memory")
        self.max_memory = int(memory.max_memory)
        relief = memory.stress_relief
        self.activate_at = self.max_memory * relief.activation_level / 100
        self.deactivate_at = self.max_memory * relief.deactivation_level / 100
        self.sample_percentage = relief.sample_percentage
        self.buffer = buffer
        self.queues = [ExporterQueue(exporter, _in_memory(config, exporter.name)) for exporter in exporters]
        self._queues_in_memory = [queue for queue in self.queues if queue.in_memory]
        self.stress_decider = _stress_decider(config, buffer, exporters, decisions, metrics, self.observe)
        self.clock = clock
        self.read_rss = rss
        self.stressed = False
        # The highest estimate seen, measured after each request before any shedding.
        self.peak = 0.0
        self._span_bytes = 0.0  # mean serialized size of a buffered span, for the exporters' queues
        self._rss_baseline = 0
        self._rss_growth = 0
        self._next_rss = 0.0
        self._stress_kept = 0
        self._task: asyncio.Task[None] | None = None
        self._active = metrics.stress_relief_active
        self._activations = metrics.stress_relief_activations
        self._stress_traces_kept = metrics.stress_relief_traces.labels("kept")
        self._stress_traces_dropped = metrics.stress_relief_traces.labels("dropped")
        self._overloaded = metrics.memory_overloaded
        metrics.memory_limit.set(self.max_memory)
        metrics.memory_estimate.set_function(self.estimate)
        metrics.memory_rss_growth.set_function(lambda: max(0, self.read_rss() - self._rss_baseline))

    def estimate(self) -> float:
        """Bytes the spans held by the buffer and the exporters' in-memory queues are estimated to take."""
        buffer = self.buffer
        if buffer.span_count:
            self._span_bytes = buffer.byte_count / buffer.span_count
        queued = sum(queue.queued_spans() for queue in self._queues_in_memory)
        return (
            buffer.byte_count * BYTES_OVERHEAD
            + len(buffer.traces) * TRACE_OVERHEAD
            + queued * self._span_bytes
        )

    def update(self) -> None:
        """Re-evaluate: stress relief on or off, shedding, the overload flag. Cheap arithmetic, except
        for the traces it decides early."""
        estimate = self.estimate()
        self.peak = max(self.peak, estimate)
        counted = estimate if estimate < self.deactivate_at else max(estimate, self._rss())
        if self.stressed and counted < self.deactivate_at:
            self._leave(estimate)
        elif not self.stressed and counted >= self.activate_at:
            self._enter(counted)
        full = self._exporters_full()
        shedding = self.stressed and not full
        self.buffer.stress_relief = self._decide_stressed if shedding else None
        if shedding and estimate >= self.activate_at:
            self._shed()
        self._set_overloaded(full and counted > self.max_memory)

    def observe(self, trace: Trace, verdicts: Sequence[Decision | None], kept_by: int | None) -> None:
        """The stress decider's observer: counts the traces it keeps."""
        if kept_by is not None:
            self._stress_kept += 1

    def start(self) -> None:
        self._rss_baseline = self.read_rss()
        log.info(
            "memory: max_memory %.1f MiB for spans, on top of %.1f MiB resident at start",
            self.max_memory / _MIB,
            self._rss_baseline / _MIB,
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tailgate-memory")

    def reconfigure(self, settings: TailSamplingConfig) -> None:
        """Stress relief keeps traces as the main decider does: with its attribute limits, adjusted counts
        and record_policy."""
        decider = self.stress_decider
        decider.use_policies(decider.policies, False, settings.adjusted_counts)
        decider.use_settings(settings)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.buffer.stress_relief = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.update()
            except Exception:
                log.exception("memory monitor update failed")

    def _rss(self) -> int:
        """RSS above its level at start, read at most every RSS_INTERVAL."""
        now = self.clock()
        if now >= self._next_rss:
            self._next_rss = now + RSS_INTERVAL
            self._rss_growth = max(0, self.read_rss() - self._rss_baseline)
        return self._rss_growth

    def _enter(self, counted: float) -> None:
        self.stressed = True
        self._active.set(1)
        self._activations.inc()
        log.warning(
            "stress relief on: memory at %.1f MiB, %.0f%% of max_memory; new traces are decided at once "
            "(%g%% kept by trace id), buffered ones early, until it is under %g%%",
            counted / _MIB,
            100 * counted / self.max_memory,
            self.sample_percentage,
            100 * self.deactivate_at / self.max_memory,
        )

    def _leave(self, estimate: float) -> None:
        self.stressed = False
        self._active.set(0)
        log.info(
            "stress relief off: memory estimate %.1f MiB, %.0f%% of max_memory",
            estimate / _MIB,
            100 * estimate / self.max_memory,
        )

    def _shed(self) -> None:
        """Decide buffered traces early, nearest their deadline first, until the estimate is under the
        activation level or an exporter is full."""
        buffer = self.buffer
        for _ in range(SHED_ROUNDS):
            excess = self.estimate() - self.activate_at
            if excess < 0 or self._exporters_full():
                return
            # About the spans whose bytes make up the excess; the trace overhead makes it converge from below.
            spans = min(SHED_SLICE, 1 + int(excess / (BYTES_OVERHEAD * self._span_bytes or 1)))
            traces = buffer.pop_earliest(spans)
            if not traces:
                return
            buffer.decide_now(traces, "max_memory")

    def _exporters_full(self) -> bool:
        return any(queue.is_full() for queue in self.queues)

    def _decide_stressed(self, traces: list[Trace], reason: str) -> None:
        """Decide new traces by trace-id hash (the buffer's stress_relief hook)."""
        kept_before = self._stress_kept
        self.stress_decider.decide_safely(traces, reason)
        kept = self._stress_kept - kept_before
        if kept:
            self._stress_traces_kept.inc(kept)
        if len(traces) > kept:
            self._stress_traces_dropped.inc(len(traces) - kept)

    def _set_overloaded(self, overloaded: bool) -> None:
        if overloaded == self.overloaded:
            return
        self.overloaded = overloaded
        self._overloaded.set(overloaded)
        if overloaded:
            log.warning(
                "memory over max_memory (%.1f MiB) and the exporters are full: refusing new requests "
                "(retry after %gs)",
                self.max_memory / _MIB,
                self.retry_after,
            )
        else:
            log.info("memory pressure eased: accepting requests again")


def build_pressure(
    config: Config,
    buffer: TraceBuffer,
    exporters: Sequence[Exporter],
    decisions: DecisionCache,
    metrics: Metrics,
) -> Pressure:
    """The memory monitor `config.memory` asks for; one that never refuses without `max_memory`."""
    if config.memory.max_memory is None:
        return Pressure(config.memory.retry_after)
    return MemoryPressure(config, buffer, exporters, decisions, metrics)


def _stress_decider(
    config: Config,
    buffer: TraceBuffer,
    exporters: Sequence[Exporter],
    decisions: DecisionCache,
    metrics: Metrics,
    observer: DecisionObserver,
) -> Decider:
    """A decider whose one policy is `probabilistic` at `sample_percentage`: the same FNV-1a rule and salt,
    so every node (and an OTel Collector) keeps the same traces under stress."""
    sampling = config.tail_sampling
    params = ProbabilisticParams(sampling_percentage=config.memory.stress_relief.sample_percentage)
    return Decider(
        buffer,
        [Probabilistic(STRESS_POLICY, params, _no_sub_policies)],
        exporters,
        decisions,
        metrics,
        time.monotonic,
        sampling.decision_tick,
        sampling.record_policy,
        adjusted_counts=sampling.adjusted_counts,
        attribute_limits=sampling.attribute_limits,
        observer=observer,
    )


def _no_sub_policies(spec: dict[str, Any], path: str) -> Policy:
    raise ValueError(f"{path}: stress relief has no sub-policies")


def _in_memory(config: Config, exporter: str) -> bool:
    """Whether exporter `exporter` queues in memory (not `sending_queue.storage: disk`)."""
    exporter_config = config.exporters.get(exporter)
    if isinstance(exporter_config, SendingExporterConfig):
        return exporter_config.sending_queue.storage == "memory"
    return True
