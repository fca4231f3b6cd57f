"""The real commands: `tailgate run` stopped with SIGTERM, and `make run` writing the file sink."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import yaml
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCSpanExporter

from tests.conftest import ROOT, TAILGATE, Downstream, free_port, gateway_config, wait_for
from tests.otlp_data import send_sdk_traces


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
    http_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    sink = tmp_path / "traces.jsonl"
    env = {
        **os.environ,
        "TAILGATE_OTLP_HTTP_ENDPOINT": f"127.0.0.1:{http_port}",
        "TAILGATE_OTLP_GRPC_ENDPOINT": f"127.0.0.1:{grpc_port}",
        "TAILGATE_ZIPKIN_ENDPOINT": f"127.0.0.1:{free_port()}",
        "TAILGATE_ADMIN_ENDPOINT": f"127.0.0.1:{admin_port}",
        "TAILGATE_FILE_PATH": str(sink),
    }
    process = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, start_new_session=True)
    try:
        await wait_ready(admin_port, process, timeout=120)
        traces = await asyncio.to_thread(
            send_sdk_traces, f"http://127.0.0.1:{http_port}/v1/traces", ["error"]
        )
        # The shipped config also listens for OTLP/gRPC.
        traces.update(
            await asyncio.to_thread(
                send_sdk_traces, f"http://127.0.0.1:{grpc_port}", ["error"], GRPCSpanExporter
            )
        )
        # The shipped config decides 2 s after the root span; the error policy keeps both.
        await wait_for(
            lambda: sink.exists() and all(trace_id.hex() in sink.read_text() for trace_id in traces),
            timeout=15,
        )
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
    assert {span["traceId"] for span in spans} == {trace_id.hex() for trace_id in traces}
    assert len(spans) == 8


def test_port_in_use_is_a_clear_start_error(tmp_path: Path, downstream: Downstream) -> None:
    config = gateway_config(downstream)
    endpoint = config["receivers"]["otlp"]["http"]["endpoint"]
    host, port = endpoint.rsplit(":", 1)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        result = subprocess.run(
            [*TAILGATE, "run", "--config", str(path)], capture_output=True, text=True, cwd=ROOT, timeout=30
        )
    assert result.returncode == 1
    assert "tailgate: cannot start" in result.stderr
    assert "Traceback" not in result.stderr
