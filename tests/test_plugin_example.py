"""The example plugin package in tests/plugin_example, installed as pip lays a package out, loaded by a
real gateway process through the `tailgate.policies` entry-point group."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.conftest import ROOT, TAILGATE, Downstream, gateway_config, wait_for
from tests.otlp_data import make_request, send
from tests.test_cli import wait_ready

PLUGIN = Path(__file__).resolve().parent / "plugin_example"


def install(target: Path) -> None:
    """What `pip install --target` leaves: the package, and dist-info with its entry points."""
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    for package in ("tailgate_route_latency",):
        shutil.copytree(PLUGIN / package, target / package)
    dist_info = target / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    lines = []
    for group, entries in project["entry-points"].items():
        lines.append(f"[{group}]")
        lines.extend(f"{name} = {value}" for name, value in entries.items())
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def trace_on_route(route: str, duration_ms: int) -> ExportTraceServiceRequest:
    request = make_request(traces=1, spans_per_trace=3)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[0].attributes.append(KeyValue(key="http.route", value=AnyValue(string_value=route)))
    spans[0].end_time_unix_nano = spans[0].start_time_unix_nano + duration_ms * 1_000_000
    return request


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def plugin_env(tmp_path: Path) -> dict[str, str]:
    target = tmp_path / "site"
    target.mkdir()
    install(target)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}


POLICY = {
    "name": "slow-routes",
    "type": "route_latency",
    "route_latency": {"routes": {"/checkout": 200}, "default_ms": 1000},
}


async def test_installed_plugin_policy_decides_in_a_real_gateway(
    tmp_path: Path, plugin_env: dict[str, str], downstream: Downstream
) -> None:
    config = gateway_config(downstream, policies=[POLICY])
    path = write_config(tmp_path / "config.yaml", config)
    admin_port = int(config["admin"]["endpoint"].rsplit(":", 1)[1])
    url = f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces"
    process = subprocess.Popen([*TAILGATE, "run", "--config", str(path)], cwd=ROOT, env=plugin_env)
    try:
        await wait_ready(admin_port, process)
        slow_checkout = trace_on_route("/checkout", 300)
        fast_checkout = trace_on_route("/checkout", 50)
        search = trace_on_route("/search", 300)  # under the default threshold
        for request in (slow_checkout, fast_checkout, search):
            await send(url, request)
        await wait_for(lambda: bool(downstream.requests), timeout=15)
        await asyncio.sleep(1.5)  # the other two are decided by now and must not arrive
    finally:
        process.terminate()
        await asyncio.to_thread(process.wait, 30)
    kept = slow_checkout.resource_spans[0].scope_spans[0].spans[0].trace_id
    assert downstream.kept_by() == {kept: {"slow-routes"}}
    assert len(downstream.spans()) == 3


def test_plugin_parameters_are_checked_with_key_paths(tmp_path: Path, plugin_env: dict[str, str]) -> None:
    bad = {**POLICY, "route_latency": {"routes": {"/checkout": -5}}}
    config = gateway_config(None, policies=[bad])
    config["exporters"] = {"file": {"path": str(tmp_path / "out.jsonl")}}
    result = subprocess.run(
        [*TAILGATE, "check-config", "--config", str(write_config(tmp_path / "bad.yaml", config))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=plugin_env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    expected = "tail_sampling.policies[0].route_latency: routes: every threshold must be a positive number"
    assert expected in result.stderr
