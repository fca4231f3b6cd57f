"""Receivers: decode spans from the wire and hand them to the trace buffer."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sampler.buffer import IngestResult, TraceBuffer
from sampler.config import Config
from sampler.exporters.base import Exporter
from sampler.metrics import Metrics
from sampler.pressure import Pressure
from sampler.receivers.common import Ingest, Receiver
from sampler.receivers.otlp_grpc import OTLPGRPCReceiver
from sampler.receivers.otlp_http import OTLPHTTPReceiver
from sampler.receivers.zipkin import ZipkinReceiver
from sampler.wal import WriteAheadLog

if TYPE_CHECKING:
    from sampler.cluster.node import ClusterNode

__all__ = ["Ingest", "Receiver", "build_receivers"]


def build_receivers(
    config: Config,
    buffer: TraceBuffer,
    metrics: Metrics,
    count_late: Callable[[IngestResult], None],
    capture: Exporter | None = None,
    pressure: Pressure | None = None,
    wal: WriteAheadLog | None = None,
    cluster: ClusterNode | None = None,
) -> list[Receiver]:
    """One receiver per configured block, all feeding `buffer` on the running event loop (and `capture`,
    if given, with every span they accept; and `wal`, if given, before buffering)."""
    # Requests in progress at shutdown get a quarter of shutdown_timeout, exporters the rest.
    grace = config.shutdown_timeout / 4

    def ingest(protocol: str) -> Ingest:
        return Ingest(protocol, buffer, metrics, count_late, capture, pressure, wal, cluster)

    receivers: list[Receiver] = []
    otlp = config.receivers.otlp
    if otlp is not None and otlp.http is not None:
        receivers.append(OTLPHTTPReceiver(otlp.http, ingest(OTLPHTTPReceiver.protocol), grace))
    if otlp is not None and otlp.grpc is not None:
        receivers.append(OTLPGRPCReceiver(otlp.grpc, ingest(OTLPGRPCReceiver.protocol), grace))
    if config.receivers.zipkin is not None:
        receivers.append(ZipkinReceiver(config.receivers.zipkin, ingest(ZipkinReceiver.protocol), grace))
    for receiver in receivers:
        receiver.reuse_port = config.workers > 1
    return receivers
