"""Outages downstream as a user sees them: traces keep flowing while the backend is down, throttling, or
the gateway is killed with kept traces queued on disk; every kept span arrives, and only once."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sampler.exporters.queue import scan_records
from tests.conftest import (
    ROOT,
    TAILGATE,
    GatewayFactory,
    free_port,
    gateway_config,
    metric,
    receiver_url,
    wait_for,
)
from tests.exporters.helpers import Downstream, Reply
from tests.otlp_data import ERRORS_ONLY, send_sdk_traces
from tests.test_cli import wait_ready

# Half the traces have an error: the policy keeps those and drops the others.
PLAN = ["error", "ok"] * 3
OUTAGE_SECONDS = 3.0


@pytest.fixture
async def downstreams() -> AsyncIterator[list[Downstream]]:
    """Scriptable OTLP/HTTP downstreams the test starts (and restarts) on a port; stopped at the end."""
    servers: list[Downstream] = []
    yield servers
    for server in servers:
        await server.stop()


async def start_downstream(servers: list[Downstream], port: int) -> Downstream:
    server = Downstream()
    await server.start(port)
    servers.append(server)
    return server


def outage_config(port: int, queue: dict[str, Any]) -> dict[str, Any]:
    """A gateway keeping error traces, exporting to `port`, retrying until delivered."""
    config = gateway_config(None, policies=ERRORS_ONLY)
    config["exporters"] = {
        "otlp_http": {
            "endpoint": f"http://127.0.0.1:{port}/v1/traces",
            "batch": {"timeout": "0.02s"},
            "retry_on_failure": {"initial_interval": "0.05s", "max_interval": "0.2s", "max_elapsed_time": 0},
            "sending_queue": queue,
        }
    }
    return config


def kept_trace_ids(sent: dict[bytes, tuple[str, int]]) -> set[bytes]:
    return {trace_id for trace_id, (kind, _) in sent.items() if kind == "error"}


def span_counts(servers: list[Downstream]) -> Counter[tuple[bytes, bytes]]:
    """How many times each span (trace id, span id) was delivered, over every downstream."""
    return Counter((span.trace_id, span.span_id) for server in servers for span in server.delivered_spans())


def check_delivery(label: str, sent: dict[bytes, tuple[str, int]], servers: list[Downstream]) -> None:
    """Every span of every kept trace delivered exactly once, nothing of a dropped trace; prints figures."""
    kept = kept_trace_ids(sent)
    counts = span_counts(servers)
    expected = sum(sent[trace_id][1] for trace_id in kept)
    per_trace = Counter(trace_id for trace_id, _ in counts)
    lost = expected - len(counts)
    duplicates = sum(counts.values()) - len(counts)
    print(
        f"\n{label}: {len(sent)} traces sent, {len(kept)} kept ({expected} spans); "
        f"{len(counts)} distinct kept spans arrived, lost {lost}, duplicates {duplicates}"
    )
    assert set(per_trace) == kept
    assert all(per_trace[trace_id] == sent[trace_id][1] for trace_id in kept)
    assert lost == 0
    assert duplicates == 0


async def send_for(url: str, seconds: float, sent: dict[bytes, tuple[str, int]]) -> None:
    """Emit traces with the OTel SDK, batch after batch, for about `seconds`."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while loop.time() < until:
        sent.update(await asyncio.to_thread(send_sdk_traces, url, PLAN))


@pytest.mark.parametrize("storage", ["memory", "disk"])
async def test_kept_spans_survive_a_downstream_outage_exactly_once(
    start_gateway: GatewayFactory, downstreams: list[Downstream], tmp_path: Path, storage: str
) -> None:
    port = free_port()
    first = await start_downstream(downstreams, port)
    queue = {"storage": storage, **({"directory": str(tmp_path)} if storage == "disk" else {})}
    gateway = await start_gateway(outage_config(port, queue))
    url = receiver_url(gateway)
    sent: dict[bytes, tuple[str, int]] = {}
    await send_for(url, 0.3, sent)
    await wait_for(lambda: first.delivered_spans() != [])

    await first.stop()
    await send_for(url, OUTAGE_SECONDS, sent)
    retries = metric(gateway, "tailgate_exporter_retries_total", exporter="otlp_http")
    queued_spans = metric(gateway, "tailgate_exporter_queue_spans", exporter="otlp_http")
    queued_bytes = metric(gateway, "tailgate_exporter_queue_bytes", exporter="otlp_http")
    await start_downstream(downstreams, port)
    await send_for(url, 0.3, sent)

    expected = sum(sent[trace_id][1] for trace_id in kept_trace_ids(sent))
    await wait_for(lambda: len(span_counts(downstreams)) >= expected, timeout=10)
    await gateway.stop()
    print(
        f"\n{storage}: downstream down {OUTAGE_SECONDS:g}s with traffic flowing: {retries:g} retries, "
        f"{queued_spans:g} spans queued ({queued_bytes:g} bytes on disk) when it came back"
    )
    check_delivery(f"outage, {storage} queue", sent, downstreams)
    assert retries > 0
    assert queued_spans > 0
    assert (queued_bytes > 0) is (storage == "disk")


async def test_a_throttling_downstream_is_given_the_wait_it_asks_for(
    start_gateway: GatewayFactory, downstreams: list[Downstream]
) -> None:
    port = free_port()
    downstream = await start_downstream(downstreams, port)
    downstream.replies = [Reply(503, headers={"Retry-After": "1"}, body=b"overloaded")] * 2
    gateway = await start_gateway(outage_config(port, {"storage": "memory"}))
    sent = await asyncio.to_thread(send_sdk_traces, receiver_url(gateway), ["error"])
    await wait_for(lambda: downstream.delivered != [], timeout=10)

    times = [attempt.at for attempt in downstream.attempts]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    print(f"\nRetry-After: 1 twice; gaps between attempts: {', '.join(f'{gap:.3f}s' for gap in gaps)}")
    assert len(times) == 3  # two 503s, then delivered
    assert all(gap >= 1.0 for gap in gaps)  # the backoff alone would wait 0.05-0.2s
    check_delivery("Retry-After", sent, downstreams)


def spans_on_disk(directory: Path) -> tuple[int, int]:
    """(records, spans) in the segment files under `directory`, read as a restart would."""
    records = spans = 0
    for segment in directory.glob("*/*.seg"):
        found, _ = scan_records(segment.read_bytes())
        records += len(found)
        spans += sum(span_count for _, _, span_count in found)
    return records, spans


def run_gateway(config: dict[str, Any], path: Path) -> subprocess.Popen[bytes]:
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen([*TAILGATE, "run", "--config", str(path)], cwd=ROOT)


def admin_port(config: dict[str, Any]) -> int:
    return int(config["admin"]["endpoint"].rsplit(":", 1)[1])


async def recovered_batches(port: int) -> float:
    name = 'tailgate_exporter_queue_recovered_batches_total{exporter="otlp_http"}'
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as reply:
        text = await reply.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_kept_traces_queued_on_disk_survive_kill_9(
    tmp_path: Path, downstreams: list[Downstream]
) -> None:
    port = free_port()
    directory = tmp_path / "queue"
    config = outage_config(port, {"storage": "disk", "directory": str(directory)})
    http_endpoint = config["receivers"]["otlp"]["http"]["endpoint"]
    process = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin_port(config), process)
        sent: dict[bytes, tuple[str, int]] = {}
        for _ in range(3):  # a few batches, each decided and queued before the next is sent
            sent.update(await asyncio.to_thread(send_sdk_traces, f"http://{http_endpoint}/v1/traces", PLAN))
            kept_spans = sum(sent[trace_id][1] for trace_id in kept_trace_ids(sent))
            await wait_for(lambda spans=kept_spans: spans_on_disk(directory)[1] == spans, timeout=10)
        queued_records, queued_spans = spans_on_disk(directory)
        process.kill()
        await asyncio.to_thread(process.wait, 10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL

    await start_downstream(downstreams, port)
    restarted = run_gateway(config, tmp_path / "config.yaml")
    try:
        await wait_ready(admin_port(config), restarted)
        await wait_for(lambda: len(span_counts(downstreams)) >= kept_spans, timeout=10)
        recovered = await recovered_batches(admin_port(config))
        # A second gateway on the same queue directory (its own ports) is refused at start.
        rival = outage_config(port, {"storage": "disk", "directory": str(directory)})
        (tmp_path / "rival.yaml").write_text(yaml.safe_dump(rival))
        conflict = await asyncio.to_thread(
            subprocess.run,
            [*TAILGATE, "run", "--config", str(tmp_path / "rival.yaml")],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
        restarted.send_signal(signal.SIGTERM)
        await asyncio.to_thread(restarted.wait, 30)
    finally:
        if restarted.poll() is None:
            restarted.kill()
    print(
        f"\nkill -9: {queued_records} batches ({queued_spans} spans) queued on disk, "
        f"{recovered:g} batches recovered at restart"
    )
    check_delivery("kill -9 and restart", sent, downstreams)
    assert queued_spans == kept_spans
    assert recovered == queued_records
    assert conflict.returncode == 1
    assert "in use by another gateway" in conflict.stderr
    assert restarted.returncode == 0
    assert spans_on_disk(directory) == (0, 0)
