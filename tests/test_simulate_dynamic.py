"""`tailgate simulate` shows the dynamic samplers converging: on a generated capture where one route is 100×
more frequent than ten others, `dynamic` keeps about 1 in its goal rate overall while keeping rare routes far
more often, and `throughput` keeps about its goal per second."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.conftest import ROOT, TAILGATE
from tests.otlp_data import otlp_json

SECONDS = 60
FREQUENT_PER_SECOND = 200
RARE_ROUTES = [f"/rare/{n}" for n in range(10)]  # 2 traces a second each: 100× rarer
START_NS = 1_700_000_000_000_000_000


def generate(path: Path, rng: random.Random) -> dict[bytes, str]:
    """One-span traces, a request line per simulated second; returns trace id → route."""
    routes: dict[bytes, str] = {}
    with path.open("wb") as capture:
        for second in range(SECONDS):
            plan = ["/frequent"] * FREQUENT_PER_SECOND + RARE_ROUTES * 2
            request = ExportTraceServiceRequest()
            scope_spans = request.resource_spans.add().scope_spans.add()
            for index, route in enumerate(plan):
                span = scope_spans.spans.add()
                span.trace_id, span.span_id = rng.randbytes(16), rng.randbytes(8)
                span.name = "GET"
                span.start_time_unix_nano = START_NS + second * 1_000_000_000 + index * 1000
                span.end_time_unix_nano = span.start_time_unix_nano + 1_000_000
                span.attributes.append(KeyValue(key="http.route", value=AnyValue(string_value=route)))
                routes[span.trace_id] = route
            capture.write(otlp_json(request) + b"\n")
    return routes


def config(tmp_path: Path, name: str, policy: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    document = {
        "tail_sampling": {"decision_wait": "1s", "policies": [policy]},
        "exporters": {"file": {"path": str(tmp_path / "unused.jsonl")}},
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_dynamic_and_throughput_converge_in_simulate(tmp_path: Path) -> None:
    capture = tmp_path / "skewed.jsonl"
    routes = generate(capture, random.Random(3))
    dynamic = {
        "name": "by-route",
        "type": "dynamic",
        "dynamic": {"key_fields": ["http.route"], "goal_sample_rate": 10, "adjustment_interval": "5s"},
    }
    throughput = {
        "name": "forty-a-second",
        "type": "throughput",
        "throughput": {
            "key_fields": ["http.route"],
            "goal_throughput_per_sec": 40,
            "adjustment_interval": "5s",
        },
    }
    result = subprocess.run(
        [
            *TAILGATE,
            "simulate",
            str(capture),
            "--config",
            str(config(tmp_path, "dynamic", dynamic)),
            "--config",
            str(config(tmp_path, "throughput", throughput)),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    by_dynamic, by_throughput = json.loads(result.stdout)["configs"]
    total = len(routes)
    assert by_dynamic["traces"] == by_throughput["traces"] == total

    # dynamic: goal 1 in 10 overall (tolerance ±20 %), rare routes kept at least 10× as often.
    assert 0.08 <= by_dynamic["kept_traces"] / total <= 0.12, by_dynamic["kept_traces"]
    kept = [bytes.fromhex(trace_id) for trace_id in by_dynamic["kept_trace_ids"]]
    frequent_total = sum(route == "/frequent" for route in routes.values())
    frequent_kept = sum(routes[trace_id] == "/frequent" for trace_id in kept)
    rare_kept = len(kept) - frequent_kept
    assert rare_kept / (total - frequent_total) >= 10 * frequent_kept / frequent_total

    # throughput: 40 kept traces a second over the run (±20 %), the first interval at the initial rate.
    per_second = by_throughput["kept_traces"] / SECONDS
    assert 32 <= per_second <= 48, per_second
