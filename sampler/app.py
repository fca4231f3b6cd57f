"""Wiring and lifecycle of one gateway: build the data path from config, start it, drain it on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import time
from functools import partial

from policies.registry import build_policies
from sampler.admin import AdminServer, registry_renderer
from sampler.buffer import DecisionCache, SpanBatch, Trace, TraceBuffer
from sampler.cluster.membership import StaticMembership, build_membership
from sampler.cluster.node import LEFT, ClusterNode
from sampler.config import Config, ForwardConfig
from sampler.decider import Decider, attribute_keys
from sampler.errors import DecodeError, PeerOverloaded
from sampler.exporters import Exporter, FileExporter, build_exporters
from sampler.metrics import Metrics
from sampler.pressure import build_pressure
from sampler.receivers import Ingest, build_receivers
from sampler.receivers.common import OVERLOADED, Unavailable
from sampler.receivers.otlp_decode import decode_protobuf
from sampler.reload import ConfigReloader, live_config, rebuild_policies
from sampler.wal import WriteAheadLog, replay_decisions
from sampler.workers import announce_worker, local_members, worker_config, worker_peer_path

log = logging.getLogger(__name__)

# The share of shutdown_timeout kept for the exporters' last flush after deciding what is buffered.
FLUSH_SHARE = 0.25

# A worker's place under a supervisor (`workers: N`): its index, the number of workers, their directory.
WorkerPlace = tuple[int, int, str]


class Gateway:
    """receivers → buffer → decider → exporters, plus the admin endpoint."""

    def __init__(
        self,
        config: Config,
        config_path: str | None = None,
        worker: WorkerPlace | None = None,
        supervisor: int | None = None,
    ) -> None:
        if worker is not None:
            config = worker_config(config, worker[1])
        self.config = config
        self.worker = worker
        # A worker's supervisor: the worker stops when it is no longer its parent (None: its parent now).
        self.supervisor = supervisor
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
        # `cluster:` or `workers: N`: this gateway owns a share of the trace ids.
        self.cluster = build_cluster(config, worker, self.buffer, self.decisions, self.metrics)
        self.receivers = build_receivers(
            config,
            self.buffer,
            self.metrics,
            self.decider.count_late,
            self.capture,
            self.pressure,
            self.wal,
            self.cluster,
        )
        if self.cluster is not None:
            # Spans peers forward: written ahead and buffered like any others, or routed on when the ring
            # here gives them to another member (views differ for a moment when members change).
            from_peers = Ingest(
                "cluster",
                self.buffer,
                self.metrics,
                self.decider.count_late,
                None,
                self.pressure,
                self.wal,
                self.cluster,
            )
            self.cluster.accept = partial(_accept_from_peer, from_peers)
            self.cluster.keep = partial(_keep_here, from_peers)
            if self.wal is not None:
                # Traces handed to other members are noted in the log, and left out when it is replayed.
                self.cluster.handed_over = self.wal.append_handed_over
        self.admin = AdminServer(config.admin.endpoint, registry_renderer(self.metrics), lambda: self.ready)
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
        if self.cluster is not None:
            await self.cluster.start()
        for receiver in self.receivers:
            await receiver.start()
        # After the receivers: their servers are part of the footprint at start that RSS is measured from.
        self.pressure.start()
        if self.reloader is not None:
            self.reloader.start()
        self.ready = True
        log.info("tailgate ready: %d policies, %d exporters", len(self.policies), len(self.exporters))
        self._announce()

    def _announce(self) -> None:
        """As a worker: tell the supervisor it serves, and the shutdown_timeout it runs by."""
        if self.worker is not None and self.admin.port is not None:
            index, _, directory = self.worker
            announce_worker(directory, index, self.admin.port, self.config.shutdown_timeout)

    async def stop(self) -> None:
        """Stop accepting, decide every buffered trace now, flush exporters; all within shutdown_timeout."""
        self.ready = False
        deadline = time.monotonic() + self.config.shutdown_timeout
        try:
            if self.reloader is not None:
                await self.reloader.stop()
            for receiver in self.receivers:
                await receiver.stop()
            if self.cluster is not None:
                # Hands buffered traces to the other members when the membership lets them know.
                await self.cluster.leave(self.config.shutdown_timeout / 2)
            if self.wal is not None:
                self.wal.stop_checkpoints()
            await self.pressure.stop()
            buffered = len(self.buffer.traces)
            # Deciding waits for room in the exporters' queues, but leaves them time to send what it
            # decided last: an exporter stuck on a downstream that never answers would otherwise take
            # all of it, and the others would have none to flush.
            await self.decider.stop(deadline - self.config.shutdown_timeout * FLUSH_SHARE)
            log.info("decided %d buffered traces at shutdown; flushing exporters", buffered)
        finally:
            # Together: each flushes for the whole time left, whatever the others do.
            remaining = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(exporter.shutdown(remaining) for exporter in self._all_exporters()))
            if self.cluster is not None:
                await self.cluster.stop()
            if self.wal is not None:
                await self.wal.close()
            await self.admin.stop()

    async def _replay(self, wal: WriteAheadLog) -> None:
        """Open the write-ahead log and buffer again what a previous run accepted and did not finish: its
        logged decisions first, so that spans of traces decided then follow those decisions. Spans queued
        for or handed to other members (a cluster) are left out: they are theirs, and each logs what it
        gets."""
        replay = await wal.open()
        replay_decisions(self.decisions, replay)
        spans = forwarded = 0
        for seq, body in replay.requests:
            try:
                batches = decode_protobuf(body)
            except DecodeError:
                continue  # a record that passed its CRC holds what a receiver decoded: not expected
            elsewhere = replay.forwarded.get(seq, set())
            if elsewhere or replay.handed_over:
                batches, left_out = _without_traces(batches, seq, elsewhere, replay.handed_over)
                forwarded += left_out
            self.buffer.seq = seq
            result = self.buffer.add_spans(batches)
            self.decider.count_late(result)
            spans += result.accepted
        wal.count_replayed(spans)
        wal.start()
        if replay.requests or replay.decisions:
            log.info(
                "write-ahead log: replayed %d requests (%d spans, leaving out %d of traces other members "
                "own) and %d decisions from %s",
                len(replay.requests),
                spans,
                forwarded,
                len(replay.decisions),
                wal.directory,
            )

    def apply_config(self, loaded: Config) -> None:
        """Run a reloaded config: everything but the restart-only sections (sampler/reload.py), which keep
        running as they are. Synchronous, so it lands between two decisions."""
        if self.worker is not None:
            loaded = worker_config(loaded, self.worker[1])
        config, restart = live_config(self.config, loaded)
        if restart:
            log.warning("config reload: these settings need a restart to change: %s", ", ".join(restart))
        sampling = config.tail_sampling
        self.policies = rebuild_policies(self.config.tail_sampling.policies, self.policies, sampling.policies)
        self.decider.reconfigure(self.policies, sampling)
        self.pressure.reconfigure(sampling)
        logging.getLogger().setLevel(config.log_level.upper())
        self.config = config
        if self.ready:
            self._announce()

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
        orphaned = None
        if self.worker is not None:
            # A worker whose supervisor died (kill -9) stops rather than hold the ports on its own.
            supervisor = os.getppid() if self.supervisor is None else self.supervisor
            orphaned = loop.create_task(_until_orphaned(supervisor), name="supervisor watch")
            orphaned.add_done_callback(lambda _: stop_requested.set())
        await stop_requested.wait()
        if orphaned is not None:
            orphaned.cancel()
        log.info("shutdown requested")
        await self.stop()


async def _until_orphaned(parent: int) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - nothing signals a parent's death: polled
        await asyncio.sleep(1.0)
    log.warning("the supervisor (pid %d) is gone; shutting down", parent)


def build_cluster(
    config: Config,
    worker: WorkerPlace | None,
    buffer: TraceBuffer,
    decisions: DecisionCache,
    metrics: Metrics,
) -> ClusterNode | None:
    """The cluster node `cluster:` configures, or a worker's place in the local ring; None for neither."""
    if worker is not None:
        index, count, directory = worker
        path = worker_peer_path(directory, index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        members = local_members(directory, count)
        membership = StaticMembership(members, members[index])
        return ClusterNode(
            members[index],
            membership,
            config.cluster.forward if config.cluster is not None else ForwardConfig(),
            buffer,
            decisions,
            metrics,
            endpoint="",
            unix_path=path,
        )
    if config.cluster is None:
        return None
    cluster = config.cluster
    return ClusterNode(
        cluster.member_id,
        build_membership(cluster),
        cluster.forward,
        buffer,
        decisions,
        metrics,
        endpoint=cluster.endpoint,
    )


def _without_traces(
    batches: list[SpanBatch], seq: int, forwarded: set[bytes], handed_over: dict[bytes, int]
) -> tuple[list[SpanBatch], int]:
    """The batches of request `seq` without the spans of its traces queued for other members
    (`forwarded`) or handed to them later (`handed_over`: trace id → the seq its spans were logged up to
    then); how many spans were left out."""
    kept: list[SpanBatch] = []
    left_out = 0
    for batch in batches:
        pairs = [(span, payload) for span, payload in zip(batch.spans, batch.payloads, strict=True)]
        staying = [
            (span, payload)
            for span, payload in pairs
            if span.trace_id not in forwarded and handed_over.get(span.trace_id, -1) < seq
        ]
        left_out += len(pairs) - len(staying)
        if staying:
            spans, payloads = zip(*staying, strict=True)
            kept.append(SpanBatch(batch.resource, batch.scope, batch.resource_payload, spans, payloads))
    return kept, left_out


def _keep_here(ingest: Ingest, traces: list[Trace]) -> None:
    """Buffer traces taken back from a member that left when the ingest cannot take them now: logged
    (over the log's bound if need be: they were accepted already, and their first logging noted them as
    queued for that member), so that a replay has them. When the log cannot be written they are buffered
    all the same, unlogged."""
    try:
        ingest.add_traces(traces, LEFT, force=True)  # routed nowhere: kept here
    except Unavailable as unavailable:
        log.error("cluster: %d traces taken back not in the write-ahead log: %s", len(traces), unavailable)
        ingest.buffer.add_traces(traces)


def _accept_from_peer(ingest: Ingest, traces: list[Trace], hops: int, ring: int) -> int:
    """Buffer traces a peer forwarded; PeerOverloaded (503 to the peer, which retries) when they cannot be
    taken now."""
    if ingest.pressure.overloaded:
        ingest.refuse("overloaded")
        raise PeerOverloaded(OVERLOADED, ingest.pressure.retry_after)
    try:
        return ingest.add_traces(traces, hops, ring).accepted
    except Unavailable as unavailable:
        raise PeerOverloaded(unavailable.message, unavailable.retry_after) from None
