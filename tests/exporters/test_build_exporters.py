"""build_exporters: one exporter per config entry, named by its key."""

from __future__ import annotations

from pathlib import Path

from sampler.config import Config
from sampler.exporters import FileExporter, OTLPHTTPExporter, build_exporters
from sampler.metrics import Metrics


def test_one_exporter_per_entry(tmp_path: Path, metrics: Metrics) -> None:
    config = Config.model_validate(
        {
            "exporters": {
                "otlp_http/backend": {"endpoint": "http://127.0.0.1:4318/v1/traces"},
                "otlp_http": {"endpoint": "http://127.0.0.1:4319/v1/traces"},
                "file": {"path": str(tmp_path / "spans.jsonl")},
            }
        }
    )
    exporters = build_exporters(config, metrics)
    assert [(exporter.name, type(exporter)) for exporter in exporters] == [
        ("otlp_http/backend", OTLPHTTPExporter),
        ("otlp_http", OTLPHTTPExporter),
        ("file", FileExporter),
    ]
