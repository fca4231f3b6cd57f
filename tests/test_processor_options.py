"""The OTel Collector's tail_sampling processor options: evaluation order, size and shutdown limits, and
options tailgate accepts without acting on them (listed by check-config, never silently ignored)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.conftest import (
    ROOT,
    TAILGATE,
    Downstream,
    GatewayFactory,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.otlp_data import ERRORS_ONLY, make_request, send

ALWAYS_THEN_RATE = [
    {"name": "all", "type": "always_sample"},
    {"name": "limited", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 1000}},
]


def verdicts(gateway: object, policy: str, decision: str) -> float:
    return metric(gateway, "tailgate_policy_decisions_total", policy=policy, decision=decision)  # type: ignore[arg-type]


async def test_sample_on_first_match_skips_later_policies(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, policies=ALWAYS_THEN_RATE, sample_on_first_match=True)
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=10, spans_per_trace=2))
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 10)
    assert verdicts(gateway, "all", "sampled") == 10
    # Never asked: its budget is untouched by traces another policy already kept.
    assert verdicts(gateway, "limited", "sampled") == 0
    assert verdicts(gateway, "limited", "not_sampled") == 0


async def test_without_first_match_every_policy_is_evaluated(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    gateway = await start_gateway(gateway_config(downstream, policies=ALWAYS_THEN_RATE))
    await send(receiver_url(gateway), make_request(traces=10, spans_per_trace=2))
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 10)
    assert verdicts(gateway, "limited", "sampled") == 10


async def test_trace_over_maximum_size_is_dropped_with_its_late_spans(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    config = gateway_config(downstream, maximum_trace_size_bytes=600, decision_wait="5s")
    gateway = await start_gateway(config)
    url = receiver_url(gateway)
    big = make_request(traces=1, spans_per_trace=20)
    small = make_request(traces=1, spans_per_trace=2)
    await send(url, big)
    await send(url, small)
    # The big trace is dropped at once, without waiting for its deadline or asking any policy.
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="maximum_trace_size_bytes") == 1
    assert metric(gateway, "tailgate_spans_decided_total", decision="dropped") == 20
    assert verdicts(gateway, "all", "sampled") == 0
    assert metric(gateway, "tailgate_buffered_spans") == 2
    await send(url, big)  # its spans again: late, following the drop
    assert metric(gateway, "tailgate_late_spans_total", decision="dropped") == 20
    await wait_for(lambda: len(downstream.spans()) == 2)
    assert set(downstream.spans_by_trace()) == {small.resource_spans[0].scope_spans[0].spans[0].trace_id}


async def test_drop_pending_traces_on_shutdown(start_gateway: GatewayFactory, downstream: Downstream) -> None:
    config = gateway_config(
        downstream,
        policies=ERRORS_ONLY,
        decision_wait="300s",
        decision_wait_after_root_received="300s",
        drop_pending_traces_on_shutdown=True,
    )
    gateway = await start_gateway(config)
    await send(receiver_url(gateway), make_request(traces=5, spans_per_trace=3, error_every=1))
    await gateway.stop()
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="shutdown_dropped") == 5
    assert metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 5
    assert not downstream.requests


def test_check_config_lists_collector_options_it_does_not_act_on(tmp_path: Path) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["tail_sampling"].update(expected_new_traces_per_sec=1000, block_on_overflow=True)
    path = tmp_path / "collector.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [*TAILGATE, "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "tail_sampling.expected_new_traces_per_sec: ignored" in result.stdout
    assert "tail_sampling.block_on_overflow: ignored" in result.stdout


async def test_drop_policies_go_first_and_end_the_evaluation(
    start_gateway: GatewayFactory, downstream: Downstream
) -> None:
    # Listed last, the drop policy still runs first: dropped traces never reach the rate limiter's bucket.
    policies = [
        {"name": "limited", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 1000}},
        {
            "name": "no-errors",
            "type": "drop",
            "drop": {
                "drop_sub_policy": [
                    {"name": "error", "type": "status_code", "status_code": {"status_codes": ["ERROR"]}}
                ]
            },
        },
    ]
    gateway = await start_gateway(gateway_config(downstream, policies=policies))
    request = make_request(traces=10, spans_per_trace=2, error_every=2)  # traces 0, 2, 4, ... have errors
    await send(receiver_url(gateway), request)
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 5)
    await wait_for(lambda: metric(gateway, "tailgate_traces_decided_total", decision="kept") == 5)
    assert verdicts(gateway, "no-errors", "dropped") == 5
    assert verdicts(gateway, "limited", "sampled") == 5  # asked only about the traces not dropped
    await wait_for(lambda: len(downstream.spans()) == 10)
    assert all(span.status.code != 2 for _, _, span in downstream.spans())
