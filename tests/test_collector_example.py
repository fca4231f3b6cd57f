"""The policies block of the OTel Collector tail sampling processor's README example, pasted unchanged into a
tailgate config: `check-config` accepts it, and `simulate` on a generated capture decides as the documented
semantics say — expected outcomes computed here, independently of tailgate's policy code."""

from __future__ import annotations

import json
import random
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.conftest import ROOT, TAILGATE
from tests.otlp_data import otlp_json
from tests.test_end_to_end import probabilistic_keeps

# As in the Collector's README, flow style and escapes included.
COLLECTOR_BLOCK = r"""
tail_sampling:
    decision_wait: 10s
    num_traces: 100
    expected_new_traces_per_sec: 10
    decision_cache:
      sampled_cache_size: 100_000
      non_sampled_cache_size: 100_000
    policies:
      [
          {
            name: test-policy-1,
            type: always_sample
          },
          {
            name: test-policy-2,
            type: latency,
            latency: {threshold_ms: 5000, upper_threshold_ms: 10000}
          },
          {
            name: test-policy-3,
            type: numeric_attribute,
            numeric_attribute: {key: key1, min_value: 50, max_value: 100}
          },
          {
            name: test-policy-4,
            type: probabilistic,
            probabilistic: {sampling_percentage: 10}
          },
          {
            name: test-policy-5,
            type: status_code,
            status_code: {status_codes: [ERROR, UNSET]}
          },
          {
            name: test-policy-6,
            type: string_attribute,
            string_attribute: {key: key2, values: [value1, value2]}
          },
          {
            name: test-policy-7,
            type: string_attribute,
            string_attribute: {key: key2, values: [value1, val*], enabled_regex_matching: true, cache_max_size: 10}
          },
          {
            name: test-policy-8,
            type: rate_limiting,
            rate_limiting: {spans_per_second: 35}
         },
         {
            name: test-policy-9,
            type: bytes_limiting,
            bytes_limiting: {bytes_per_second: 1024000, burst_capacity: 2048000}
         },
         {
            name: test-policy-10,
            type: span_count,
            span_count: {min_spans: 2, max_spans: 20}
         },
         {
             name: test-policy-11,
             type: trace_state,
             trace_state: { key: key3, values: [value1, value2] }
         },
         {
              name: test-policy-12,
              type: boolean_attribute,
              boolean_attribute: {key: key4, value: true}
         },
         {
              name: test-policy-13,
              type: ottl_condition,
              ottl_condition: {
                   error_mode: ignore,
                   span: [
                        "attributes[\"test_attr_key_1\"] == \"test_attr_val_1\"",
                        "attributes[\"test_attr_key_2\"] != \"test_attr_val_1\"",
                   ],
                   spanevent: [
                        "name != \"test_span_event_name\"",
                        "attributes[\"test_event_attr_key_2\"] != \"test_event_attr_val_1\"",
                   ]
              }
         },
         {
            name: and-policy-1,
            type: and,
            and: {
              and_sub_policy:
              [
                {
                  name: test-and-policy-1,
                  type: numeric_attribute,
                  numeric_attribute: { key: key1, min_value: 50, max_value: 100 }
                },
                {
                    name: test-and-policy-2,
                    type: string_attribute,
                    string_attribute: { key: key2, values: [ value1, value2 ] }
                },
              ]
            }
         },
         {
            name: drop-policy-1,
            type: drop,
            drop: {
              drop_sub_policy:
              [
                {
                    name: test-drop-policy-1,
                    type: string_attribute,
                    string_attribute: {key: url.path, values: [\/health, \/metrics], enabled_regex_matching: true}
                }
              ]
            }
         },
         {
            name: composite-policy-1,
            type: composite,
            composite:
              {
                max_total_spans_per_second: 1000,
                policy_order: [test-composite-policy-1, test-composite-policy-2, test-composite-policy-3],
                composite_sub_policy:
                  [
                    {
                      name: test-composite-policy-1,
                      type: numeric_attribute,
                      numeric_attribute: {key: key1, min_value: 50}
                    },
                    {
                      name: test-composite-policy-2,
                      type: string_attribute,
                      string_attribute: {key: key2, values: [value1, value2]}
                    },
                    {
                      name: test-composite-policy-3,
                      type: always_sample
                    }
                  ],
                rate_allocation:
                  [
                    {
                      policy: test-composite-policy-1,
                      percent: 50
                    },
                    {
                      policy: test-composite-policy-2,
                      percent: 25
                    }
                  ]
              }
          },
        ]
"""

TRACES = 300


@dataclass
class Plan:
    """One generated trace and the facts the policies look at."""

    trace_id: bytes
    spans: int
    duration_ms: int
    key1: int | None
    key2: str | None
    key4: bool | None
    url_path: str | None
    trace_state: str
    statuses: list[int]  # per span: 0 UNSET, 1 OK, 2 ERROR


def plan_traces(rng: random.Random) -> list[Plan]:
    plans = []
    for _ in range(TRACES):
        spans = rng.choice([1, 2, 5, 20, 21, 25])
        ok_only = rng.random() < 0.5
        statuses = [1 if ok_only else rng.choice([0, 1]) for _ in range(spans)]
        if rng.random() < 0.1:
            statuses[rng.randrange(spans)] = 2
        plans.append(
            Plan(
                trace_id=rng.randbytes(16),
                spans=spans,
                duration_ms=rng.choice([100, 6000, 12000]),
                key1=rng.choice([None, 10, 50, 75, 100, 150]),
                key2=rng.choice([None, "value1", "value2", "value3", "other", "valid"]),
                key4=rng.choice([None, True, False]),
                url_path=rng.choice([None, "/health", "/healthz", "/metrics", "/api/orders"]),
                trace_state=rng.choice(["", "key3=value1", "key3=other,vendor=x", "vendor=y,key3=value2"]),
                statuses=statuses,
            )
        )
    return plans


def attribute(key: str, value: int | str | bool) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def request_of(plan: Plan, start_ns: int) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.append(attribute("service.name", "example"))
    scope_spans = resource_spans.scope_spans.add()
    root_id = random.Random(plan.trace_id).randbytes(8)
    for index in range(plan.spans):
        span = scope_spans.spans.add()
        span.trace_id = plan.trace_id
        span.span_id = root_id if index == 0 else random.Random(plan.trace_id + bytes([index])).randbytes(8)
        if index:
            span.parent_span_id = root_id
        span.name = f"op {index}"
        span.start_time_unix_nano = start_ns + index * 1000
        span.end_time_unix_nano = start_ns + (plan.duration_ms * 1_000_000 if index == 0 else 500_000)
        span.status.code = plan.statuses[index]  # type: ignore[assignment]
        if index == 0:
            span.trace_state = plan.trace_state
            for key, value in (
                ("key1", plan.key1),
                ("key2", plan.key2),
                ("key4", plan.key4),
                ("url.path", plan.url_path),
            ):
                if value is not None:
                    span.attributes.append(attribute(key, value))
    return request


def write_capture(path: Path, plans: list[Plan]) -> None:
    start_ns = 1_700_000_000_000_000_000
    with path.open("wb") as capture:
        for number, plan in enumerate(plans):
            # Four traces a second of span time: the 10 s decision_wait holds ~40 traces at a time.
            capture.write(otlp_json(request_of(plan, start_ns + number * 250_000_000)) + b"\n")


def expected_matches(plan: Plan) -> dict[str, bool]:
    """Per policy, whether it matches the trace, from the Collector's documented semantics."""
    key2 = plan.key2
    trace_state = dict(member.split("=", 1) for member in plan.trace_state.split(",") if member)
    return {
        "test-policy-1": True,
        "test-policy-2": 5000 < plan.duration_ms <= 10000,
        "test-policy-3": plan.key1 is not None and 50 <= plan.key1 <= 100,
        "test-policy-4": probabilistic_keeps(plan.trace_id, 10),
        "test-policy-5": any(status in (0, 2) for status in plan.statuses),
        "test-policy-6": key2 in ("value1", "value2"),
        "test-policy-7": key2 is not None and bool(re.search("value1|val*", key2)),
        "test-policy-10": 2 <= plan.spans <= 20,
        "test-policy-11": trace_state.get("key3") in ("value1", "value2"),
        "test-policy-12": plan.key4 is True,
        # Its second span condition holds for every span without that attribute: all of them here.
        "test-policy-13": True,
        "and-policy-1": plan.key1 is not None and 50 <= plan.key1 <= 100 and key2 in ("value1", "value2"),
    }


def dropped(plan: Plan) -> bool:
    return plan.url_path is not None and bool(re.search(r"/health|/metrics", plan.url_path))


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "collector.yaml"
    path.write_text(COLLECTOR_BLOCK + f"exporters:\n  file:\n    path: {tmp_path / 'out.jsonl'}\n")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TAILGATE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False
    )


def test_collector_example_runs_through_check_config_and_simulate(tmp_path: Path) -> None:
    config = config_file(tmp_path)
    checked = run("check-config", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "tail_sampling.expected_new_traces_per_sec: ignored" in checked.stdout

    plans = plan_traces(random.Random(7))
    capture = tmp_path / "capture.jsonl"
    write_capture(capture, plans)
    simulated = run("simulate", str(capture), "--config", str(config), "--format", "json")
    assert simulated.returncode == 0, simulated.stderr
    (result,) = json.loads(simulated.stdout)["configs"]

    # test-policy-1 samples everything; only the drop policy, evaluated first, takes traces out.
    kept = [plan for plan in plans if not dropped(plan)]
    assert result["traces"] == TRACES
    assert set(result["kept_trace_ids"]) == {plan.trace_id.hex() for plan in kept}
    policies: dict[str, Any] = {policy["name"]: policy for policy in result["policies"]}
    assert policies["test-policy-1"]["kept"] == len(kept)  # the first policy that sampled is recorded
    assert policies["drop-policy-1"]["kept"] == 0
    # A drop ends the evaluation, so the other policies only see the traces it let through.
    for name in expected_matches(plans[0]):
        expected = sum(expected_matches(plan)[name] for plan in kept)
        assert policies[name]["matched"] == expected, name
