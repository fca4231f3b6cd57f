"""Exporters: where kept traces go, one per `exporters:` entry of the config."""

from __future__ import annotations

from sampler.config import (
    Config,
    FileExporterConfig,
    OTLPGRPCExporterConfig,
    OTLPHTTPExporterConfig,
    ZipkinExporterConfig,
)
from sampler.exporters.base import Exporter
from sampler.exporters.file import FileExporter
from sampler.exporters.otlp_grpc import OTLPGRPCExporter
from sampler.exporters.otlp_http import OTLPHTTPExporter
from sampler.exporters.zipkin import ZipkinExporter
from sampler.metrics import Metrics

__all__ = [
    "Exporter",
    "FileExporter",
    "OTLPGRPCExporter",
    "OTLPHTTPExporter",
    "ZipkinExporter",
    "build_exporters",
]


def build_exporters(config: Config, metrics: Metrics) -> list[Exporter]:
    """One exporter per `config.exporters` entry, named by its key (`type` or `type/name`)."""
    exporters: list[Exporter] = []
    for name, exporter_config in config.exporters.items():
        if isinstance(exporter_config, OTLPHTTPExporterConfig):
            exporters.append(OTLPHTTPExporter(name, exporter_config, metrics))
        elif isinstance(exporter_config, OTLPGRPCExporterConfig):
            exporters.append(OTLPGRPCExporter(name, exporter_config, metrics))
        elif isinstance(exporter_config, ZipkinExporterConfig):
            exporters.append(ZipkinExporter(name, exporter_config, metrics))
        elif isinstance(exporter_config, FileExporterConfig):
            exporters.append(FileExporter(name, exporter_config, metrics))
    return exporters
