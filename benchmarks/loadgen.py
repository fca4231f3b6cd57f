"""OTLP load generator in its own process: a lean asyncio HTTP/1.1 keep-alive client on uvloop, or
(`--protocol grpc`) grpc.aio channels calling TraceService/Export with the same request bodies.

Prints JSON lines on stdout: `measure_start` and `measure_stop` events around the measured window,
then one `result` object (spans acknowledged with a 2xx per second, non-2xx counts, own CPU use).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvloop
from workload import BodyStream, build_pool, describe, load_pool

HEADER_END = b"\r\n\r\n"
# Statuses that tell a client to back off: it pauses that connection briefly, as an SDK would.
BACKOFF_STATUSES = frozenset((429, 502, 503, 504))
BACKOFF_SECONDS = 0.01
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# gRPC codes an OTLP client retries after a pause; reported under their names in `non_2xx`.
GRPC_BACKOFF_CODES = frozenset((grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED))


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


@dataclass(slots=True)
class Counters:
    requests_ok: int = 0
    spans_ok: int = 0
    non_2xx: dict[int | str, int] = field(default_factory=dict)
    spans_rejected: int = 0
    connection_errors: int = 0
    latencies: list[float] = field(default_factory=list)


class LoadGenerator:
    """Drives `connections` keep-alive connections, each with one request in flight."""

    def __init__(self, stream: BodyStream, host: str, port: int, path: str, connections: int) -> None:
        self.stream = stream
        self.host = host
        self.port = port
        self.connections = connections
        self._head_prefix = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            "Content-Type: application/x-protobuf\r\nUser-Agent: tailgate-loadgen\r\n"
        ).encode()
        self._heads: dict[int, bytes] = {}
        self.counters = Counters()
        self.measuring = False
        self.stopping = False
        self.spans_sent = 0
        self.max_spans: int | None = None
        # Other gateways (cluster members) the connections are spread over.
        self.extra_ports: list[int] = []

    def _connection_ports(self) -> list[int]:
        """The port of each connection: round-robin over the gateway's port and `extra_ports`."""
        ports = [self.port, *self.extra_ports]
        return [ports[n % len(ports)] for n in range(self.connections)]

    def _head(self, length: int) -> bytes:
        head = self._heads.get(length)
        if head is None:
            head = self._heads[length] = self._head_prefix + b"Content-Length: %d\r\n\r\n" % length
        return head

    async def _read_response(self, reader: asyncio.StreamReader) -> tuple[int, bool]:
        """Read one response; returns (status, keep-alive)."""
        block = await reader.readuntil(HEADER_END)
        status = int(block[9:12])
        lowered = block.lower()
        keep_alive = b"connection: close" not in lowered
        pos = lowered.find(b"\r\ncontent-length:")
        if pos >= 0:
            end = lowered.index(b"\r\n", pos + 2)
            length = int(lowered[pos + 17 : end])
            if length:
                await reader.readexactly(length)
        elif b"transfer-encoding: chunked" in lowered:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        elif status >= 200 and status not in (204, 304):
            keep_alive = False  # body delimited by close
            await reader.read()
        return status, keep_alive

    async def _connection(self, port: int) -> None:
        counters = self.counters
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while not self.stopping:
                if self.max_spans is not None and self.spans_sent >= self.max_spans:
                    return
                if writer is None:
                    try:
                        reader, writer = await asyncio.open_connection(self.host, port)
                    except OSError:
                        counters.connection_errors += 1
                        await asyncio.sleep(0.05)
                        continue
                assert reader is not None
                body, spans = self.stream.next_body()
                self.spans_sent += spans
                started = time.perf_counter()
                try:
                    writer.writelines((self._head(len(body)), body))
                    await writer.drain()
                    status, keep_alive = await self._read_response(reader)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    counters.connection_errors += 1
                    writer.close()
                    writer = None
                    continue
                self._record(200 <= status < 300, status, spans, started)
                if not keep_alive:
                    writer.close()
                    writer = None
                if status in BACKOFF_STATUSES:
                    await asyncio.sleep(BACKOFF_SECONDS)
        finally:
            if writer is not None:
                writer.close()

    def _record(self, ok: bool, status: int | str, spans: int, started: float) -> None:
        """Count one completed request if it finished inside the measured window."""
        if not self.measuring:
            return
        counters = self.counters
        if ok:
            counters.requests_ok += 1
            counters.spans_ok += spans
        else:
            counters.non_2xx[status] = counters.non_2xx.get(status, 0) + 1
            counters.spans_rejected += spans
        counters.latencies.append(time.perf_counter() - started)

    async def run_for(self, warmup: float, duration: float) -> dict[str, Any]:
        """Load for warm-up + duration seconds; count only responses completed in the window."""
        tasks = [asyncio.create_task(self._connection(port)) for port in self._connection_ports()]
        try:
            await asyncio.sleep(warmup)
            return await self._measure(duration, tasks)
        finally:
            await self._stop(tasks)

    async def run_count(self, spans: int, limit: float) -> dict[str, Any]:
        """Send `spans` spans (rounded up to whole requests) as fast as the server acknowledges."""
        self.max_spans = spans
        tasks = [asyncio.create_task(self._connection(port)) for port in self._connection_ports()]
        try:
            return await self._measure(limit, tasks)
        finally:
            await self._stop(tasks)

    async def _measure(self, limit: float, tasks: list[asyncio.Task[None]]) -> dict[str, Any]:
        self.measuring = True
        emit("measure_start")
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        await asyncio.wait(tasks, timeout=limit)
        self.measuring = False
        wall = time.perf_counter() - wall_start
        cpu = time.process_time() - cpu_start
        emit("measure_stop")
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise RuntimeError("connection task failed") from task.exception()
        return self._result(wall, cpu)

    async def _stop(self, tasks: list[asyncio.Task[None]]) -> None:
        self.stopping = True
        # Let in-flight requests finish so the server is not left with half-read bodies.
        _, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _result(self, wall: float, cpu: float) -> dict[str, Any]:
        counters = self.counters
        latencies = sorted(counters.latencies)

        def quantile(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

        return {
            "seconds": round(wall, 3),
            "requests_ok": counters.requests_ok,
            "spans_ok": counters.spans_ok,
            "spans_per_second": counters.spans_ok / wall if wall else 0.0,
            "non_2xx": {str(k): v for k, v in sorted(counters.non_2xx.items(), key=lambda kv: str(kv[0]))},
            "spans_rejected": counters.spans_rejected,
            "connection_errors": counters.connection_errors,
            "latency_ms_p50": round(quantile(0.5) * 1e3, 2),
            "latency_ms_p99": round(quantile(0.99) * 1e3, 2),
            "loadgen_cpu_seconds": round(cpu, 3),
            "loadgen_cpu_utilization": round(cpu / wall, 3) if wall else 0.0,
        }


class GRPCLoadGenerator(LoadGenerator):
    """The same load over OTLP/gRPC: one channel (one HTTP/2 connection) per connection slot."""

    async def _connection(self, port: int) -> None:
        channel = grpc.aio.insecure_channel(
            f"{self.host}:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
        )
        export = channel.unary_unary(EXPORT_METHOD)
        try:
            while not self.stopping:
                if self.max_spans is not None and self.spans_sent >= self.max_spans:
                    return
                body, spans = self.stream.next_body()
                self.spans_sent += spans
                started = time.perf_counter()
                try:
                    await export(body, timeout=30)
                except grpc.aio.AioRpcError as error:
                    code = error.code()
                    self._record(False, code.name, spans, started)
                    if code in GRPC_BACKOFF_CODES:
                        await asyncio.sleep(BACKOFF_SECONDS)
                    continue
                self._record(True, 0, spans, started)
        finally:
            await channel.close()


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    pool = load_pool(args.pool) if args.pool else build_pool(seed=args.seed)
    kind = GRPCLoadGenerator if args.protocol == "grpc" else LoadGenerator
    generator = kind(BodyStream(pool), args.host, args.port, args.path, args.connections)
    if isinstance(generator, LoadGenerator) and args.extra_ports:
        generator.extra_ports = [int(port) for port in args.extra_ports.split(",")]
    if args.spans:
        result = await generator.run_count(args.spans, args.timeout)
    else:
        result = await generator.run_for(args.warmup, args.duration)
    result["connections"] = args.connections
    result["workload"] = describe(pool)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--extra-ports", default="", help="more ports, comma-separated, for the connections")
    parser.add_argument("--path", default="/v1/traces", help="the OTLP/HTTP path")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--spans", type=int, default=0, help="send this many spans, then stop")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound for --spans mode")
    parser.add_argument("--pool", type=Path, help="a pool written by workload.py --out")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loadgen only sends to loopback")
    result = uvloop.run(_main(args))
    emit("result", **result)


if __name__ == "__main__":
    main()
