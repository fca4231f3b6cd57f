"""`tailgate simulate`: a capture replayed offline keeps what the gateway kept, configs side by side."""

from __future__ import annotations

import io
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from policies.registry import build_policy
from sampler.exporters.file import request_to_json
from sampler.simulate import Progress
from tests.conftest import ROOT, TAILGATE, GatewayFactory, gateway_config, metric, receiver_url, wait_for
from tests.otlp_data import send

POLICIES = [
    {"name": "errors", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}},
    {"name": "slow", "type": "latency", "latency": {"threshold_ms": 500}},
    {"name": "baseline", "type": "probabilistic", "probabilistic": {"sampling_percentage": 20}},
]
START_NS = 1_700_000_000_000_000_000


def traffic(rng: random.Random, traces: int, start_ns: int) -> ExportTraceServiceRequest:
    """Whole traces of three spans: one in ten has an error, one in ten takes 800 ms, the rest 5 ms."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = "checkout"
    scope_spans = resource_spans.scope_spans.add()
    for number in range(traces):
        kind = rng.choice(["error", "slow", *["ok"] * 8])
        trace_id, root_id = rng.randbytes(16), rng.randbytes(8)
        start = start_ns + number * 1_000_000
        duration = 800_000_000 if kind == "slow" else 5_000_000
        for index in range(3):
            span = scope_spans.spans.add(trace_id=trace_id, name=f"op{index}")
            span.span_id = root_id if index == 0 else rng.randbytes(8)
            if index:
                span.parent_span_id = root_id
            span.start_time_unix_nano = start
            span.end_time_unix_nano = start + duration // (index + 1)
            if kind == "error" and index == 2:
                span.status.code = 2
    return request


def write_capture(path: Path, requests: list[ExportTraceServiceRequest]) -> None:
    path.write_bytes(b"".join(request_to_json(request.SerializeToString()) + b"\n" for request in requests))


def write_config(path: Path, config: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def trace_ids(path: Path) -> set[str]:
    """The trace ids in an OTLP JSON lines file (hex)."""
    return {
        span["traceId"]
        for line in path.read_text().splitlines()
        for resource_spans in json.loads(line)["resourceSpans"]
        for scope_spans in resource_spans["scopeSpans"]
        for span in scope_spans["spans"]
    }


def tailgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TAILGATE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def simulate_json(capture: Path, *configs: str) -> dict[str, Any]:
    options = [option for config in configs for option in ("--config", config)]
    result = tailgate("simulate", str(capture), *options, "--format", "json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


async def test_replaying_the_capture_keeps_what_the_gateway_kept(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    config = gateway_config(None, policies=POLICIES)
    config["exporters"]["file"] = {"path": str(tmp_path / "kept.jsonl"), "batch": {"timeout": "0.02s"}}
    config["capture"] = {"path": str(tmp_path / "capture.jsonl"), "batch": {"timeout": "0.02s"}}
    gateway = await start_gateway(config)
    rng = random.Random(11)
    traces = 400
    for batch in range(8):
        await send(receiver_url(gateway), traffic(rng, traces // 8, START_NS + batch * 100_000_000))
    await wait_for(
        lambda: (
            metric(gateway, "tailgate_traces_decided_total", decision="kept")
            + metric(gateway, "tailgate_traces_decided_total", decision="dropped")
            == traces
        )
    )
    await gateway.stop()
    kept_by_gateway = trace_ids(tmp_path / "kept.jsonl")

    document = simulate_json(tmp_path / "capture.jsonl", write_config(tmp_path / "config.yaml", config))
    (result,) = document["configs"]
    assert set(result["kept_trace_ids"]) == kept_by_gateway
    assert result["traces"] == traces
    assert result["spans"] == 3 * traces
    assert (
        result["kept_traces"]
        == len(kept_by_gateway)
        == metric(gateway, "tailgate_traces_decided_total", decision="kept")
    )
    policies = {policy["name"]: policy for policy in result["policies"]}
    assert sum(policy["kept"] for policy in policies.values()) == len(kept_by_gateway)
    for name in ("errors", "slow", "baseline"):
        assert policies[name]["traces"] == traces
        assert policies[name]["matched"] >= policies[name]["kept"] > 0
        assert policies[name]["kept_spans"] == 3 * policies[name]["kept"]
    # A slow or failed trace that the baseline also samples is recorded under the first policy.
    assert policies["errors"]["matched"] == policies["errors"]["kept"]


def test_configs_side_by_side(tmp_path: Path) -> None:
    rng = random.Random(12)
    capture = tmp_path / "capture.jsonl"
    write_capture(capture, [traffic(rng, 250, START_NS + n * 1_000_000_000) for n in range(8)])
    configs = []
    for percentage in (10, 50):
        config = gateway_config(
            None, policies=[POLICIES[2] | {"probabilistic": {"sampling_percentage": percentage}}]
        )
        config["exporters"]["file"] = {"path": str(tmp_path / "unused.jsonl")}
        configs.append(write_config(tmp_path / f"p{percentage}.yaml", config))

    document = simulate_json(capture, *configs)
    ten, fifty = document["configs"]
    assert [ten["config"], fifty["config"]] == configs
    assert ten["traces"] == fifty["traces"] == 2000
    assert abs(ten["keep_rate"] - 0.10) < 0.03
    assert abs(fifty["keep_rate"] - 0.50) < 0.05
    # Exactly the traces the policy's trace-id hash keeps.
    policy: Any = build_policy(POLICIES[2] | {"probabilistic": {"sampling_percentage": 10}}, "p")
    ids = trace_ids(capture)
    assert set(ten["kept_trace_ids"]) == {
        t for t in ids if policy.hash_trace_id(bytes.fromhex(t)) <= policy.threshold
    }
    assert set(ten["kept_trace_ids"]) <= set(fifty["kept_trace_ids"])

    kept_ids = tmp_path / "kept.tsv"
    table = tailgate(
        "simulate", str(capture), "-c", configs[0], "-c", configs[1], "--kept-ids", str(kept_ids)
    )
    assert table.returncode == 0, table.stderr
    header = table.stdout.splitlines()[0]
    assert configs[0] in header and configs[1] in header
    assert "keep rate" in table.stdout and "baseline" in table.stdout
    assert f"{ten['kept_traces']:,}" in table.stdout and f"{fifty['kept_traces']:,}" in table.stdout
    lines = [line.split("\t") for line in kept_ids.read_text().splitlines()]
    assert len(lines) == ten["kept_traces"] + fifty["kept_traces"]
    assert {trace_id for config, trace_id, _ in lines if config == configs[0]} == set(ten["kept_trace_ids"])
    assert {policy for _, _, policy in lines} == {"baseline"}


def test_errors(tmp_path: Path) -> None:
    config = gateway_config(None)
    config["exporters"]["file"] = {"path": str(tmp_path / "unused.jsonl")}
    good = write_config(tmp_path / "good.yaml", config)
    config["tail_sampling"]["policies"] = [{"name": "x", "type": "latency", "latency": {"threshold_ms": -1}}]
    bad = write_config(tmp_path / "bad.yaml", config)
    capture = tmp_path / "capture.jsonl"
    write_capture(capture, [traffic(random.Random(13), 5, START_NS)])

    result = tailgate("simulate", str(capture), "--config", good, "--config", bad)
    assert result.returncode == 2
    assert result.stderr == tailgate("check-config", "--config", bad).stderr
    assert "tail_sampling.policies[0].latency.threshold_ms" in result.stderr

    result = tailgate("simulate", str(tmp_path / "missing.jsonl"), "--config", good)
    assert result.returncode == 1
    assert (
        result.stderr
        == f"tailgate: cannot read capture {tmp_path / 'missing.jsonl'}: No such file or directory\n"
    )

    with capture.open("ab") as file:
        file.write(b"\n{not json\n")
    result = tailgate("simulate", str(capture), "--config", good)
    assert result.returncode == 1
    assert result.stderr.startswith(f"tailgate: capture {capture} line 3: malformed JSON")
    assert result.stdout == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal() -> None:
    terminal = Terminal()
    bar = Progress(2000, terminal)
    bar.update(500)
    bar.close()
    assert f"\r[{'#' * 7}{'.' * 23}]  25% 500 B / 2.0 kB" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r")
    pipe = io.StringIO()
    Progress(2000, pipe).update(500)
    assert pipe.getvalue() == ""
