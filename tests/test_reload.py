"""Config reload: buffered traces decided by the reloaded policies, none lost; SIGHUP on a real process with
traffic flowing (an invalid config keeps the old one, a valid one applies); `reload.watch`; restart-only keys.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from prometheus_client.parser import text_string_to_metric_families

import sampler.reload
from sampler.app import Gateway
from sampler.config import Config, load_config, parse_config
from tests.conftest import (
    ROOT,
    TAILGATE,
    Downstream,
    free_port,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.otlp_data import ERRORS_ONLY, make_request, send
from tests.test_cli import wait_ready

ALL = [{"name": "all", "type": "always_sample"}]
GOLD = [
    {"name": "gold", "type": "string_attribute", "string_attribute": {"key": "tenant", "values": ["gold"]}}
]
SPANS_PER_TRACE = 3

CONFIG_FILE = "config.yaml"

FileGateway = Callable[[dict[str, Any]], Awaitable[Gateway]]


@pytest.fixture
async def file_gateway(tmp_path: Path) -> AsyncIterator[FileGateway]:
    """Starts an in-process gateway from CONFIG_FILE in the test's directory, which it can reload."""
    gateways: list[Gateway] = []

    async def start(config: dict[str, Any]) -> Gateway:
        path = tmp_path / CONFIG_FILE
        write_config(path, config)
        gateways.append(Gateway(load_config(path), str(path)))
        await gateways[-1].start()
        return gateways[-1]

    yield start
    await asyncio.gather(*(gateway.stop() for gateway in gateways if gateway.ready))


def write_config(path: Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))


def with_sampling(config: dict[str, Any], **sampling: Any) -> dict[str, Any]:
    """`config` with these tail_sampling keys changed."""
    return {**config, "tail_sampling": {**config["tail_sampling"], **sampling}}


def trace_ids(request: ExportTraceServiceRequest) -> dict[bytes, bool]:
    """Trace id → whether the trace has an ERROR span, in the request's order."""
    found: dict[bytes, bool] = {}
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found[span.trace_id] = found.get(span.trace_id, False) or span.status.code == 2
    return found


def decided(gateway: Gateway) -> float:
    return metric(gateway, "tailgate_traces_decided_total", decision="kept") + metric(
        gateway, "tailgate_traces_decided_total", decision="dropped"
    )


def assert_complete(downstream: Downstream, expected: set[bytes]) -> None:
    """Exactly `expected` arrived downstream, each trace with all its spans, each span once."""
    received = downstream.spans_by_trace()
    assert set(received) == expected
    assert all(len(spans) == SPANS_PER_TRACE for spans in received.values())
    assert all(len({span.span_id for span in spans}) == SPANS_PER_TRACE for spans in received.values())


async def test_buffered_traces_are_decided_by_the_reloaded_policies(
    tmp_path: Path, downstream: Downstream, file_gateway: FileGateway
) -> None:
    path = tmp_path / CONFIG_FILE
    config = gateway_config(
        downstream, policies=ERRORS_ONLY, decision_wait="1.5s", decision_wait_after_root_received="1.5s"
    )
    gateway = await file_gateway(config)
    request = make_request(60, SPANS_PER_TRACE)  # no errors: policy A would drop them all
    sent_at = time.monotonic()
    await send(receiver_url(gateway), request)
    assert len(gateway.buffer.traces) == 60
    write_config(path, with_sampling(config, policies=ALL))
    assert gateway.reloader is not None
    assert gateway.reloader.reload()
    reloaded_at = time.monotonic()
    assert len(gateway.buffer.traces) == 60  # the swap decides nothing
    await wait_for(lambda: decided(gateway) >= 60)
    decided_at = time.monotonic()
    await wait_for(lambda: len(downstream.spans()) >= 60 * SPANS_PER_TRACE)
    assert_complete(downstream, set(trace_ids(request)))
    assert set().union(*downstream.kept_by().values()) == {"all"}
    assert metric(gateway, "tailgate_traces_decided_total", decision="kept") == 60
    assert metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 0
    assert metric(gateway, "tailgate_traces_decided_early_total", reason="num_traces") == 0
    assert metric(gateway, "tailgate_config_reloads_total", result="applied") == 1
    assert metric(gateway, "tailgate_config_last_reload_success") == 1
    print(
        f"\n60 buffered traces: reload at +{reloaded_at - sent_at:.2f}s, decided by the new policy at "
        f"+{decided_at - sent_at:.2f}s (deadline +1.5s); kept 60, dropped 0, lost 0"
    )


def tenant_request(traces: int) -> tuple[ExportTraceServiceRequest, set[bytes]]:
    """A request whose even traces carry `tenant: gold` on their second span; and those traces' ids."""
    request = make_request(traces, SPANS_PER_TRACE)
    spans = request.resource_spans[0].scope_spans[0].spans
    gold: set[bytes] = set()
    for number in range(0, traces, 2):
        span = spans[number * SPANS_PER_TRACE + 1]
        span.attributes.append(KeyValue(key="tenant", value=AnyValue(string_value="gold")))
        gold.add(span.trace_id)
    return request, gold


async def test_attribute_keys_added_by_a_reload_are_read_from_buffered_spans(
    tmp_path: Path, downstream: Downstream, file_gateway: FileGateway
) -> None:
    path = tmp_path / CONFIG_FILE
    config = gateway_config(downstream, policies=ERRORS_ONLY, decision_wait="300s")
    gateway = await file_gateway(with_sampling(config, decision_wait_after_root_received="300s"))
    before, gold_before = tenant_request(20)
    await send(receiver_url(gateway), before)  # `tenant` is not extracted: no policy reads it yet
    write_config(path, with_sampling(config, policies=GOLD, decision_wait_after_root_received="0.1s"))
    assert gateway.reloader is not None and gateway.reloader.reload()
    after, gold_after = tenant_request(20)
    await send(receiver_url(gateway), after)
    # The shorter root wait caps the buffered traces' 300 s deadlines at the reload + 0.1 s.
    await wait_for(lambda: decided(gateway) >= 40)
    await wait_for(lambda: len(downstream.spans()) >= 20 * SPANS_PER_TRACE)
    assert_complete(downstream, gold_before | gold_after)
    assert metric(gateway, "tailgate_traces_decided_total", decision="dropped") == 20
    print(
        f"\nbuffered before the reload: {len(gold_before)}/20 gold kept; after: {len(gold_after)}/20 gold "
        f"kept; {decided(gateway):.0f} decided of 40"
    )


async def test_a_shorter_decision_wait_applies_to_buffered_traces(
    tmp_path: Path, downstream: Downstream, file_gateway: FileGateway
) -> None:
    path = tmp_path / CONFIG_FILE
    config = gateway_config(downstream, decision_wait="300s", decision_wait_after_root_received="300s")
    gateway = await file_gateway(config)
    first = make_request(30, SPANS_PER_TRACE)
    await send(receiver_url(gateway), first)
    write_config(path, with_sampling(config, decision_wait="0.3s", decision_wait_after_root_received="0.2s"))
    assert gateway.reloader is not None and gateway.reloader.reload()
    reloaded_at = time.monotonic()
    second = make_request(30, SPANS_PER_TRACE)
    await send(receiver_url(gateway), second)
    await wait_for(lambda: decided(gateway) >= 60)
    waited = time.monotonic() - reloaded_at
    await wait_for(lambda: len(downstream.spans()) >= 60 * SPANS_PER_TRACE)
    assert_complete(downstream, set(trace_ids(first)) | set(trace_ids(second)))
    print(f"\n60 traces buffered with a 300 s wait decided {waited:.2f}s after the reload to 0.2-0.3 s")


async def test_unchanged_policies_keep_their_state(
    tmp_path: Path, downstream: Downstream, file_gateway: FileGateway
) -> None:
    path = tmp_path / CONFIG_FILE
    limit = {"name": "limit", "type": "rate_limiting", "rate_limiting": {"spans_per_second": 10}}
    config = gateway_config(downstream, policies=[limit, *ERRORS_ONLY])
    gateway = await file_gateway(config)
    running = gateway.decider.policies
    errors = {**ERRORS_ONLY[0], "status_code": {"status_codes": ["ERROR", "UNSET"]}}
    write_config(path, with_sampling(config, policies=[errors, limit]))
    assert gateway.reloader is not None and gateway.reloader.reload()
    # The same rate_limiting object, its bucket as it was; the changed policy built anew.
    assert gateway.decider.policies[1] is running[0]
    assert gateway.decider.policies[0] is not running[1]
    assert [policy.name for policy in gateway.decider.policies] == ["errors", "limit"]


async def test_restart_only_changes_are_named_and_the_rest_applies(
    tmp_path: Path,
    downstream: Downstream,
    file_gateway: FileGateway,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)  # the root logger's level, restored after the test: the reload changes it
    path = tmp_path / CONFIG_FILE
    config = gateway_config(downstream, policies=ERRORS_ONLY)
    gateway = await file_gateway(config)
    url = receiver_url(gateway)
    changed = with_sampling(config, policies=ALL, decision_cache={"sampled_cache_size": 7})
    changed["exporters"] = {"otlp_http": {**config["exporters"]["otlp_http"], "timeout": "3s"}}
    changed["receivers"] = {"otlp": {"http": {"endpoint": f"127.0.0.1:{free_port()}"}}}
    changed["log_level"] = "warning"
    changed["durability"] = "wal"
    changed["wal"] = {"directory": str(tmp_path / "wal")}
    write_config(path, changed)
    with caplog.at_level(logging.WARNING, logger="sampler.app"):
        assert gateway.reloader is not None and gateway.reloader.reload()
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [
        "config reload: these settings need a restart to change: durability, exporters.otlp_http.timeout, "
        "receivers.otlp.http.endpoint, tail_sampling.decision_cache.sampled_cache_size, wal.directory"
    ]
    assert metric(gateway, "tailgate_config_reloads_total", result="applied") == 1
    assert logging.getLogger().level == logging.WARNING
    # Still on the old receiver endpoint and exporter; the new policy keeps traces without errors.
    request = make_request(10, SPANS_PER_TRACE)
    await send(url, request)
    await wait_for(lambda: len(downstream.spans()) >= 10 * SPANS_PER_TRACE)
    assert_complete(downstream, set(trace_ids(request)))
    assert gateway.config.exporters == parse_config(config).exporters
    assert gateway.config.tail_sampling.decision_cache.sampled_cache_size == 100_000
    assert gateway.config.durability == "none" and gateway.wal is None
    print(f"\nwarning: {warnings[0]}")


async def test_watch_reloads_a_changed_file_without_a_signal(
    tmp_path: Path, downstream: Downstream, file_gateway: FileGateway
) -> None:
    path = tmp_path / CONFIG_FILE
    config = gateway_config(downstream, policies=ERRORS_ONLY)
    config["reload"] = {"watch": True, "interval": "0.05s"}
    gateway = await file_gateway(config)
    before = path.stat()
    # The same size and modification time: only the content hash tells the files apart.
    text = path.read_text()
    changed = text.replace("name: errors", "name: errorz").replace("- ERROR", "- UNSET")
    assert len(changed) == len(text) and changed != text
    path.write_text(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    started = time.monotonic()
    await wait_for(lambda: metric(gateway, "tailgate_config_reloads_total", result="applied") == 1)
    noticed = time.monotonic() - started
    assert [policy.name for policy in gateway.decider.policies] == ["errorz"]
    path.write_text(text.replace("status_codes", "status_kodes"))
    await wait_for(lambda: metric(gateway, "tailgate_config_reloads_total", result="failed") == 1)
    assert metric(gateway, "tailgate_config_last_reload_success") == 0
    assert [policy.name for policy in gateway.decider.policies] == ["errorz"]
    print(f"\nwatch (interval 0.05s) applied a same-size, same-mtime edit after {noticed:.2f}s")


async def test_an_unexpected_failure_reading_the_file_is_a_failed_reload_and_the_watch_goes_on(
    tmp_path: Path, downstream: Downstream, file_gateway: FileGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / CONFIG_FILE
    config = gateway_config(downstream, policies=ERRORS_ONLY)
    config["reload"] = {"watch": True, "interval": "0.05s"}
    gateway = await file_gateway(config)
    load_config = sampler.reload.load_config

    def failing(path: str) -> Config:  # a bug in validating, once
        monkeypatch.setattr(sampler.reload, "load_config", load_config)
        raise RuntimeError("a bug")

    monkeypatch.setattr(sampler.reload, "load_config", failing)
    text = path.read_text()
    path.write_text(text.replace("name: errors", "name: errorz"))
    await wait_for(lambda: metric(gateway, "tailgate_config_reloads_total", result="failed") == 1)
    path.write_text(text.replace("name: errors", "name: errorx"))  # the watch is still there
    await wait_for(lambda: metric(gateway, "tailgate_config_reloads_total", result="applied") == 1)
    assert [policy.name for policy in gateway.decider.policies] == ["errorx"]


class Traffic:
    """Posts requests of 4 traces (half with an ERROR span) to a receiver, one after another, until
    stopped; remembers each trace sent, in order."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: list[tuple[bytes, bool]] = []
        self._stopped = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        self._stopped.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while not self._stopped.is_set():
                request = make_request(4, SPANS_PER_TRACE, error_every=2)
                body = request.SerializeToString()
                headers = {"Content-Type": "application/x-protobuf"}
                async with session.post(self.url, data=body, headers=headers) as reply:
                    assert reply.status == 200, await reply.text()
                self.sent.extend(trace_ids(request).items())
                await asyncio.sleep(0.01)

    async def sent_more(self, count: int) -> int:
        """Wait until `count` more traces were sent; how many were sent in all then."""
        target = len(self.sent) + count
        await wait_for(lambda: len(self.sent) >= target)
        return len(self.sent)


async def scrape(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as reply,
    ):
        text = await reply.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def wait_for_metric(admin_port: int, name: str, value: float, **labels: str) -> None:
    key = (name, tuple(sorted(labels.items())))
    deadline = time.monotonic() + 10
    while (await scrape(admin_port)).get(key) != value:
        assert time.monotonic() < deadline, f"{name}{labels} never became {value}"
        await asyncio.sleep(0.02)


async def test_sighup_with_traffic_flowing(tmp_path: Path, downstream: Downstream) -> None:
    path = tmp_path / CONFIG_FILE
    config = gateway_config(downstream, policies=ERRORS_ONLY, decision_wait_after_root_received="0.3s")
    write_config(path, config)
    admin_port = int(config["admin"]["endpoint"].rsplit(":", 1)[1])
    url = f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces"
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen([*TAILGATE, "run", "--config", str(path)], cwd=ROOT, stderr=log_file)
    traffic = Traffic(url)
    try:
        await wait_ready(admin_port, process)
        traffic.start()
        await traffic.sent_more(20)

        invalid = with_sampling(
            config, policies=[{**ERRORS_ONLY[0], "status_code": {"status_codes": ["FATAL"]}}]
        )
        write_config(path, invalid)
        process.send_signal(signal.SIGHUP)
        await wait_for_metric(admin_port, "tailgate_config_reloads_total", 1, result="failed")
        await wait_for_metric(admin_port, "tailgate_config_last_reload_success", 0)
        assert process.poll() is None
        # Still the old policy: once every trace sent so far is decided, only those with errors arrived.
        old_policy_until = await traffic.sent_more(20)
        await wait_for_decided(admin_port, old_policy_until)
        old_policy = dict(traffic.sent[:old_policy_until])
        errors = {trace_id for trace_id, error in old_policy.items() if error}
        await wait_for(lambda: errors <= set(downstream.spans_by_trace()))

        write_config(path, with_sampling(config, policies=ALL))
        process.send_signal(signal.SIGHUP)
        await wait_for_metric(admin_port, "tailgate_config_reloads_total", 1, result="applied")
        new_policy_from = len(traffic.sent)
        await traffic.sent_more(40)
        await traffic.stop()
        sent = len(traffic.sent)
        await wait_for_decided(admin_port, sent)
        await wait_for_metric(admin_port, "tailgate_buffered_traces", 0)
        metrics = await scrape(admin_port)
        kept = metrics["tailgate_traces_decided_total", (("decision", "kept"),)]
        dropped = metrics["tailgate_traces_decided_total", (("decision", "dropped"),)]
        await wait_for(lambda: len(downstream.spans()) >= kept * SPANS_PER_TRACE)
        assert process.poll() is None
    finally:
        await traffic.stop()
        process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(process.wait, 30)
    # The log names the key path as check-config does.
    check = subprocess.run(
        [*TAILGATE, "check-config", "--config", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert check.returncode == 0
    write_config(path, invalid)
    check = subprocess.run(
        [*TAILGATE, "check-config", "--config", str(path)], capture_output=True, text=True, cwd=ROOT
    )
    assert check.returncode == 2
    key_path_message = check.stderr.splitlines()[-1]
    assert key_path_message.startswith("tail_sampling.policies[0]")
    assert key_path_message in log_path.read_text()
    assert kept + dropped == sent
    received = downstream.spans_by_trace()
    assert len(received) == kept
    assert_complete(downstream, set(received))
    # Decided before the valid reload: by the old policy.
    kept_old = {trace_id for trace_id in received if trace_id in old_policy}
    assert kept_old == errors
    after = traffic.sent[new_policy_from:]
    assert all(trace_id in received for trace_id, _ in after)
    assert {downstream.kept_by()[trace_id].pop() for trace_id, _ in after} == {"all"}
    print(
        f"\nsent {sent} traces ({old_policy_until} under the old policy, {sent - new_policy_from} after the "
        f"valid reload); kept {kept:.0f} + dropped {dropped:.0f} = {kept + dropped:.0f}; old-policy "
        f"keeps {len(kept_old)}/{old_policy_until} (the errors); after the reload {len(after)}/{len(after)} "
        f"kept, every kept trace complete"
    )


async def wait_for_decided(admin_port: int, traces: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        metrics = await scrape(admin_port)
        done = sum(
            metrics.get(("tailgate_traces_decided_total", (("decision", decision),)), 0.0)
            for decision in ("kept", "dropped")
        )
        if done >= traces:
            return
        assert time.monotonic() < deadline, f"only {done} of {traces} traces decided"
        await asyncio.sleep(0.02)
