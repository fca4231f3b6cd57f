"""The real commands: `tailgate check-config`, `tailgate run` with SIGTERM, and `make run`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import Downstream, free_port, gateway_config, wait_for
from tests.otlp_data import send_sdk_traces

ROOT = Path(__file__).resolve().parents[1]
TAILGATE = [sys.executable, "-m", "sampler"]


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


async def wait_ready(admin_port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            assert process.poll() is None, "gateway exited early"
            try:
                async with session.get(f"http://127.0.0.1:{admin_port}/readyz") as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("gateway did not become ready")


async def test_sigterm_decides_and_flushes_buffered_traces(tmp_path: Path, downstream: Downstream) -> None:
    config = gateway_config(downstream, decision_wait="300s", decision_wait_after_root_received="300s")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    admin_port = int(config["admin"]["endpoint"].rsplit(":", 1)[1])
    http_endpoint = config["receivers"]["otlp"]["http"]["endpoint"]
    process = subprocess.Popen([*TAILGATE, "run", "--config", str(path)], cwd=ROOT)
    try:
        await wait_ready(admin_port, process)
        traces = await asyncio.to_thread(send_sdk_traces, f"http://{http_endpoint}/v1/traces", ["ok"] * 20)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{admin_port}/metrics") as reply,
        ):
            text = await reply.text()
        assert "tailgate_buffered_spans 80.0" in text
        assert not downstream.requests
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            process.kill()
    assert returncode == 0
    received = downstream.spans_by_trace()
    assert set(received) == set(traces)
    assert all(len(spans) == 4 for spans in received.values())


async def test_make_run_starts_and_writes_the_file_sink(tmp_path: Path) -> None:
    http_port, admin_port = free_port(), free_port()
    sink = tmp_path / "traces.jsonl"
    env = {
        **os.environ,
        "TAILGATE_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
        "TAILGATE_ADMIN_ENDPOINT": f"127.0.0.1:{admin_port}",
        "TAILGATE_FILE_PATH": str(sink),
    }
    process = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, start_new_session=True)
    try:
        await wait_ready(admin_port, process, timeout=120)
        traces = await asyncio.to_thread(
            send_sdk_traces, f"http://127.0.0.1:{http_port}/v1/traces", ["error"]
        )
        (trace_id,) = traces
        # The shipped config decides 2 s after the root span; the error policy keeps it.
        await wait_for(lambda: sink.exists() and trace_id.hex() in sink.read_text(), timeout=15)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    lines = sink.read_text().splitlines()
    spans = [
        span
        for line in lines
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
        for span in scope_spans["spans"]
    ]
    assert {span["traceId"] for span in spans} == {trace_id.hex()}
    assert len(spans) == 4
