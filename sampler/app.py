"""Wiring and lifecycle of one gateway: build the data path from config, start it, drain it on shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time

from policies.registry import build_policies
from sampler.admin import AdminServer
from sampler.buffer import DecisionCache, TraceBuffer
from sampler.config import Config
from sampler.decider import Decider, attribute_keys
from sampler.errors import DecodeError
from sampler.exporters import Exporter, FileExporter, build_exporters
from sampler.metrics import Metrics
from sampler.pressure import build_pressure
from sampler.receivers import build_receivers
from sampler.receivers.otlp_decode import decode_protobuf
from sampler.reload import ConfigReloader, live_config, rebuild_policies
from sampler.wal import WriteAheadLog, replay_decisions

log = logging.getLogger(__name__)


class Gateway:
    """receivers → buffer → decider → exporters, plus the admin endpoint."""

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        sampling = config.tail_sampling
        self.policies = build_policies(sampling.policies, "tail_sampling.policies")
        self.decisions = DecisionCache(
            sampling.decision_cache.sampled_cache_size,
            sampling.decision_cache.non_sampled_cache_size,
        )
        self.buffer = TraceBuffer(sampling, attribute_keys(self.policies), self.decisions, time.monotonic)
        self.exporters = build_exporters(config, self.metrics)
        self.decider = Decider(
            self.buffer,
            self.policies,
            self.exporters,
            self.decisions,
            self.metrics,
            time.monotonic,
            sampling.decision_tick,
            sampling.record_policy,
            sampling.sample_on_first_match,
            sampling.drop_pending_traces_on_shutdown,
            sampling.adjusted_counts,
            attribute_limits=sampling.attribute_limits,
        )
        self.buffer.connect(self.decider.decide_safely, self.decider.forward_late)
        self.metrics.watch_buffer(
            lambda: len(self.buffer.traces),
            lambda: self.buffer.span_count,
            lambda: self.buffer.byte_count,
        )
        # Not one of the decider's exporters: it gets every received span, before sampling.
        self.capture = (
            None if config.capture is None else FileExporter("capture", config.capture, self.metrics)
        )
        # `memory:`: stress relief, and the flag receivers check to refuse requests when overloaded.
        self.pressure = build_pressure(config, self.buffer, self.exporters, self.decisions, self.metrics)
        # `durability: wal`: requests written ahead before they are buffered, replayed after a crash.
        self.wal = (
            WriteAheadLog(config.wal, self.metrics, self.buffer, self.decisions, self.exporters)
            if config.durability == "wal"
            else None
        )
        self.receivers = build_receivers(
            config, self.buffer, self.metrics, self.decider.count_late, self.capture, self.pressure, self.wal
        )
        self.admin = AdminServer(config.admin.endpoint, self.metrics, lambda: self.ready)
        # With the file the config came from: reloaded on SIGHUP and, with `reload.watch`, when it changes.
        self.reloader = (
            None
            if config_path is None
            else ConfigReloader(config_path, config.reload, self.apply_config, self.metrics)
        )
        self.ready = False

    async def start(self) -> None:
        await self.admin.start()
        for exporter in self._all_exporters():
            await exporter.start()
        self.decider.start()
        if self.wal is not None:
            await self._replay(self.wal)
        for receiver in self.receivers:
            await receiver.start()
        # After the receivers: their servers are part of the footprint at start that RSS is measured from.
        self.pressure.start()
        if self.reloader is not None:
            self.reloader.start()
        self.ready = True
        log.info("tailgate ready: %d policies, %d exporters", len(self.policies), len(self.exporters))

    async def stop(self) -> None:
        """Stop accepting, decide every buffered trace now, flush exporters; all within shutdown_timeout."""
        self.ready = False
        deadline = time.monotonic() + self.config.shutdown_timeout
        try:
            if self.reloader is not None:
                await self.reloader.stop()
            for receiver in self.receivers:
                await receiver.stop()
            if self.wal is not None:
                self.wal.stop_checkpoints()
            await self.pressure.stop()
            buffered = len(self.buffer.traces)
            await self.decider.stop(deadline)
            log.info("decided %d buffered traces at shutdown; flushing exporters", buffered)
        finally:
            # Together: each flushes for the whole time left, whatever the others do.
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(exporter.shutdown(remaining) for exporter in self._all_exporters()))
            if self.wal is not None:
                await self.wal.close()
            await self.admin.stop()

    async def _replay(self, wal: WriteAheadLog) -> None:
        """Open the write-ahead log and buffer again what a previous run accepted and did not finish: its
        logged decisions first, so that spans of traces decided then follow those decisions."""
        replay = await wal.open()
        replay_decisions(self.decisions, replay)
        spans = 0
        for seq, body in replay.requests:
            try:
                batches = decode_protobuf(body)
            except DecodeError:
                continue  # a record that passed its CRC holds what a receiver decoded: not expected
            self.buffer.seq = seq
            result = self.buffer.add_spans(batches)
            self.decider.count_late(result)
            spans += result.accepted
        wal.count_replayed(spans)
        wal.start()
        if replay.requests or replay.decisions:
            log.info(
                "write-ahead log: replayed %d requests (%d spans) and %d decisions from %s",
                len(replay.requests),
                spans,
                len(replay.decisions),
                wal.directory,
            )

    def apply_config(self, loaded: Config) -> None:
        """Run a reloaded config: everything but the restart-only sections (sampler/reload.py), which keep
        running as they are. Synchronous, so it lands between two decisions."""
        config, restart = live_config(self.config, loaded)
        if restart:
            log.warning("config reload: these settings need a restart to change: %s", ", ".join(restart))
        sampling = config.tail_sampling
        self.policies = rebuild_policies(self.config.tail_sampling.policies, self.policies, sampling.policies)
        self.decider.reconfigure(self.policies, sampling)
        logging.getLogger().setLevel(config.log_level.upper())
        self.config = config

    def _all_exporters(self) -> list[Exporter]:
        """The decider's exporters and the capture."""
        return [*self.exporters, *([] if self.capture is None else [self.capture])]

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then shut down cleanly."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop_requested.set)
        if self.reloader is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reloader.reload)
        try:
            await self.start()
        except BaseException:
            await self.stop()  # release whatever did start (ports, files) before reporting
            raise
        # Everything built at start-up lives as long as the process: keep it out of GC scans.
        gc.freeze()
        await stop_requested.wait()
        log.info("shutdown requested")
        await self.stop()
