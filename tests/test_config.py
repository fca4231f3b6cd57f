"""`tailgate check-config` on good and bad configs: exit 0, or 2 with every problem named by key path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

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
