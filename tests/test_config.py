"""`tailgate check-config` on good and bad configs: exit 0, or 2 with every problem named by key path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sampler.config import parse_config
from tests.conftest import ROOT, TAILGATE


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TAILGATE, "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def test_shipped_config_is_valid() -> None:
    result = check_config(ROOT / "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda c: c["tail_sampling"]["policies"][1]["latency"].update(threshold_ms=-5),
            "tail_sampling.policies[1].latency.threshold_ms",
        ),
        (
            lambda c: c["tail_sampling"]["policies"][0].update(type="no_such_policy"),
            "tail_sampling.policies[0].type",
        ),
        (lambda c: c["tail_sampling"].update(decision_wait="soon"), "tail_sampling.decision_wait"),
        (lambda c: c["tail_sampling"].update(num_traces=0), "tail_sampling.num_traces"),
        (
            lambda c: c["receivers"]["otlp"]["http"].update(endpoint="nowhere"),
            "receivers.otlp.http.endpoint",
        ),
        (
            lambda c: c["exporters"].update({"otlp_http": {"endpoint": "ftp://x"}}),
            "exporters.otlp_http.endpoint",
        ),
        (lambda c: c["exporters"].update({"kafka": {}}), "exporters"),
        (lambda c: c.update(unknown_key=1), "unknown_key"),
        (
            lambda c: c["receivers"]["otlp"]["http"].update(endpoint="${TAILGATE_TEST_UNSET_VAR}"),
            "receivers.otlp.http.endpoint: environment variable TAILGATE_TEST_UNSET_VAR",
        ),
        (lambda c: c["tail_sampling"].update(num_traces=True), "tail_sampling.num_traces: must be a number"),
        (lambda c: c["tail_sampling"].update(decision_wait=float("inf")), "tail_sampling.decision_wait"),
        (lambda c: c["exporters"].update({"file": "traces.jsonl"}), "must be a mapping"),
        (
            lambda c: c["receivers"]["otlp"]["http"].update(max_request_bytes=10**30),
            "receivers.otlp.http.max_request_bytes",
        ),
        (lambda c: c["receivers"].update(zipkin={"endpoint": "9411"}), "receivers.zipkin.endpoint"),
        (
            lambda c: c["receivers"]["otlp"].update(grpc={"max_request_bytes": 0}),
            "receivers.otlp.grpc.max_request_bytes",
        ),
        (lambda c: c.update(receivers={"otlp": {}}), "receivers: no receiver configured"),
        (
            lambda c: c["exporters"].update({"otlp_grpc/backend": {"endpoint": "https://x/v1/traces"}}),
            "exporters.otlp_grpc/backend.endpoint",
        ),
        (
            lambda c: c["exporters"].update(
                {"otlp_grpc": {"endpoint": "127.0.0.1:4317", "headers": {"Auth Token": "x"}}}
            ),
            "exporters.otlp_grpc.headers: invalid gRPC metadata key 'auth token'",
        ),
        (
            lambda c: c["exporters"].update({"zipkin": {"endpoint": "zipkin:9411"}}),
            "exporters.zipkin.endpoint",
        ),
        (lambda c: c.update(durability="fsync"), "durability"),
        (lambda c: c.update(wal={"fsync": "sometimes"}), "wal.fsync"),
        (lambda c: c.update(workers=0), "workers"),
        (lambda c: c.update(cluster={}), "cluster: set exactly one of peers (a static list) and redis"),
        (
            lambda c: c.update(cluster={"redis": {"heartbeat": "2s", "timeout": "1s"}}),
            "cluster.redis: timeout must be longer than heartbeat",
        ),
        (
            lambda c: c.update(workers=2, cluster={"peers": ["127.0.0.1:4319"]}),
            "cluster: cannot be combined with workers above 1",
        ),
        (lambda c: c.update(cluster={"endpoint": "4319", "peers": ["a"]}), "cluster.endpoint"),
        (
            lambda c: c.update(cluster={"peers": ["a:1"], "forward": {"max_batch_bytes": (64 << 20) + 1}}),
            "cluster.forward.max_batch_bytes",
        ),
        (
            lambda c: c.update(workers=2, durability="wal"),
            "workers: cannot be combined with durability: wal",
        ),
        (
            lambda c: c.update(
                workers=2,
                exporters={
                    "otlp_http/backend": {
                        "endpoint": "http://127.0.0.1:4318/v1/traces",
                        "sending_queue": {"storage": "disk", "directory": "/var/lib/tailgate/queue"},
                    }
                },
            ),
            "workers: cannot be combined with the disk sending queue of exporter 'otlp_http/backend'",
        ),
    ],
    ids=[
        "policy-param",
        "policy-type",
        "duration",
        "range",
        "endpoint",
        "url",
        "exporter-type",
        "unknown-key",
        "env-var",
        "bool-count",
        "infinite",
        "exporter-not-mapping",
        "limit-too-big",
        "zipkin-endpoint",
        "grpc-limit",
        "no-receiver",
        "grpc-exporter-endpoint",
        "grpc-metadata-key",
        "zipkin-exporter-url",
        "durability",
        "wal-fsync",
        "workers",
        "cluster-membership",
        "redis-timeout",
        "cluster-and-workers",
        "cluster-endpoint",
        "forward-batch-over-request-limit",
        "workers-and-wal",
        "workers-and-disk-queue",
    ],
)
def test_check_config_names_the_key_path(tmp_path: Path, mutate: Any, message: str) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = check_config(path)
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_check_config_reports_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    assert check_config(tmp_path / "missing.yaml").returncode == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("receivers: [unclosed\n")
    result = check_config(bad)
    assert result.returncode == 2
    assert "invalid YAML" in result.stderr


def test_env_substitution_with_default(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["tail_sampling"]["num_traces"] = "${TAILGATE_TEST_TRACES:-1000}"
    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump(config))
    assert check_config(path).returncode == 0
    assert check_config(path, {"TAILGATE_TEST_TRACES": "0"}).returncode == 2


def test_receivers_run_when_their_block_is_present() -> None:
    exporters = {"file": {"path": "traces.jsonl"}}
    default = parse_config({"exporters": exporters}).receivers
    assert default.otlp is not None and default.otlp.http is not None
    assert default.otlp.grpc is None and default.zipkin is None
    # A present key with no settings (YAML `grpc:`) turns the receiver on with its defaults.
    chosen = parse_config({"receivers": {"otlp": {"grpc": None}, "zipkin": None}, "exporters": exporters})
    receivers = chosen.receivers
    assert receivers.otlp is not None and receivers.otlp.http is None
    assert receivers.otlp.grpc is not None and receivers.otlp.grpc.endpoint == "127.0.0.1:4317"
    assert receivers.zipkin is not None and receivers.zipkin.endpoint == "127.0.0.1:9411"


def test_grpc_exporter_endpoint_forms() -> None:
    def endpoint(value: str) -> str:
        config = parse_config({"exporters": {"otlp_grpc": {"endpoint": value, "headers": {"X-Tenant": "a"}}}})
        exporter = config.exporters["otlp_grpc"]
        assert exporter.type == "otlp_grpc" and exporter.headers == {"x-tenant": "a"}
        return exporter.endpoint

    assert endpoint("collector:4317") == "collector:4317"
    assert endpoint("http://collector:4317/") == "collector:4317"
