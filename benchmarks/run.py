"""The tailgate benchmark: empty handler, limit probe, full gateway and its memory per buffered span.

Every server and the load generator run as separate processes on 127.0.0.1; figures are reported as
ratios to the limit probe measured in the same run, and nothing is asserted about time.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import google.protobuf
from google.protobuf.internal import api_implementation
from workload import build_pool, describe, save_pool

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"
RSS_GOAL_BYTES = 400
RATIO_GOAL = 0.5
SCALEOUT_GOAL = 0.8
WARMUP_SPANS = 20_480

PIPELINE_CONFIG = """\
receivers:
  otlp:
    http: {{endpoint: "{host}:{port}", max_request_bytes: 16777216}}
    grpc: {{endpoint: "{host}:{grpc_port}", max_request_bytes: 16777216}}
admin: {{endpoint: "{host}:{admin_port}"}}
tail_sampling:
  decision_wait: {decision_wait}
  decision_wait_after_root_received: {root_wait}
  num_traces: {num_traces}
  max_buffered_spans: {max_buffered_spans}
  policies:
    - {{name: errors, type: status_code, status_code: {{status_codes: [ERROR]}}}}
    - {{name: slow, type: latency, latency: {{threshold_ms: 1000}}}}
    - {{name: sample10, type: probabilistic, probabilistic: {{sampling_percentage: 10}}}}
exporters:
  otlp_http:
    endpoint: "http://{host}:{downstream_port}/v1/traces"
    compression: none
{extra}"""


class BenchError(Exception):
    """A server did not start or a run could not complete."""


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nothing is bound to and not handed out before in this run: ports are chosen before
    the servers bind them (a member's peers before its own listeners), so the kernel may offer one twice."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; fields resume after its closing one.
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a gateway may run worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot: tells a live pid from a reused one."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its descendants."""
    total = 0
    for member in process_tree(pid):
        fields = _stat_fields(member)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of a process and its descendants."""
    total = 0
    for member in process_tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total += int(match.group(1)) * 1024
    return total


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None when there is none."""
    total: float | None = None
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        found = dict(_LABEL.findall(match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total = (total or 0.0) + float(match.group(3))
    return total


@dataclass
class Child:
    """A server process started by this run, with its stderr in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    # (pid, start time) of the process tree seen at readiness, to reap workers left behind.
    known_tree: list[tuple[int, int | None]] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, argv: list[str], log_dir: Path) -> Child:
        log_path = log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, cwd=REPO_DIR, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        return cls(name, process, log_path)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, port: int, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if http_get(port, path, timeout=1.0)[0] == 200:
                    self.remember_tree()
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def remember_tree(self) -> None:
        self.known_tree = [(pid, start_time(pid)) for pid in process_tree(self.pid)]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.remember_tree()
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        for pid, started in self.known_tree:  # workers the server may have left behind
            if pid != self.pid and started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


class LineReader:
    """Reads JSON lines from a child's stdout with a deadline on every read."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self.fd = process.stdout.fileno()
        self.buffer = b""

    def next_event(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError("load generator did not report in time")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise BenchError("load generator exited without a result")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        event: dict[str, Any] = json.loads(line)
        return event


class Bench:
    """One benchmark run: owns the temp dir, the pool, the children and the results."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children: list[Child] = []
        self.pool_path = tmp / "pool.pkl"
        self.python = sys.executable
        self.profiles = 0  # measured windows recorded with --profile

    def log(self, message: str) -> None:
        if not self.args.json:
            print(message, file=sys.stderr, flush=True)

    def start(self, name: str, argv: list[str], port: int, ready_path: str) -> Child:
        child = Child.start(name, argv, self.tmp)
        self.children.append(child)
        child.wait_ready(port, ready_path, timeout=self.args.start_timeout)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def loadgen(
        self,
        port: int,
        extra: list[str],
        deadline: float,
        on_event: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        argv = [
            self.python,
            str(BENCH_DIR / "loadgen.py"),
            "--port",
            str(port),
            "--pool",
            str(self.pool_path),
            "--connections",
            str(self.args.connections),
            *extra,
        ]
        log_path = self.tmp / "loadgen.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        try:
            reader = LineReader(process)
            end = time.monotonic() + deadline
            while True:
                try:
                    event = reader.next_event(end)
                except BenchError as exc:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise BenchError(f"{exc}\n{tail}") from exc
                kind = event.pop("event")
                if kind == "result":
                    process.wait(timeout=10)
                    # Reported once at the top level of the report.
                    event.pop("workload", None)
                    event.pop("connections", None)
                    return event
                if on_event is not None:
                    on_event(kind)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
            assert process.stdout is not None
            process.stdout.close()

    def throughput(
        self,
        port: int,
        server: Child,
        protocol: str = "http",
        more: list[tuple[int, Child]] | None = None,
        watched: Sequence[Child] = (),
    ) -> dict[str, Any]:
        """Timed load; the servers' CPU (each with its descendants) is sampled at the load generator's
        window edges. `more`: other gateways (cluster members) the connections are spread over;
        `watched`: gateways that get no connections but whose CPU counts (listed last per server in
        `server_cpu_seconds_each`)."""
        cpu: dict[str, list[float]] = {}
        servers = [server, *(child for _, child in more or []), *watched]
        profilers: list[subprocess.Popen[bytes]] = []

        def on_event(kind: str) -> None:
            cpu[kind] = [cpu_seconds(child.pid) for child in servers]
            if kind == "measure_start" and self.args.profile is not None:
                profilers.extend(self.profile(servers))

        args = self.args
        extra = ["--duration", str(args.duration), "--warmup", str(args.warmup), "--protocol", protocol]
        if more:
            extra += ["--extra-ports", ",".join(str(member_port) for member_port, _ in more)]
        result = self.loadgen(port, extra, deadline=args.duration + args.warmup + 30, on_event=on_event)
        for profiler in profilers:
            profiler.wait(timeout=30)
        each = [stop - start for start, stop in zip(cpu["measure_start"], cpu["measure_stop"], strict=True)]
        server_cpu = sum(each)
        result["server_cpu_seconds_each"] = [round(seconds, 3) for seconds in each]
        result["server_cpu_seconds"] = round(server_cpu, 3)
        result["server_cpu_utilization"] = round(server_cpu / result["seconds"], 3)
        result["spans_per_cpu_second"] = result["spans_ok"] / server_cpu if server_cpu else 0.0
        return result

    def profile(self, servers: list[Child]) -> list[subprocess.Popen[bytes]]:
        """py-spy sampling every process of `servers` for the measured window, as collapsed stacks in
        the --profile directory (one file per process)."""
        directory: Path = self.args.profile
        directory.mkdir(parents=True, exist_ok=True)
        self.profiles += 1
        return [
            subprocess.Popen(
                [
                    shutil.which("py-spy", path=Path(sys.executable).parent) or "py-spy",
                    "record",
                    "--pid",
                    str(pid),
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--duration",
                    str(max(1, int(self.args.duration))),
                    "--nonblocking",
                    "--output",
                    str(directory / f"{self.profiles:02d}-{child.name}-{pid}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for child in servers
            for pid in process_tree(child.pid)
        ]

    def run_probe(self, mode: str) -> dict[str, Any]:
        port = free_port()
        name = "probe" if mode == "group" else mode
        self.log(f"-- {name}: {self.args.duration:.0f}s of load")
        argv = [self.python, str(BENCH_DIR / "probe.py"), "--port", str(port), "--mode", mode]
        ready_port = port
        if mode == "grpc-empty":
            ready_port = free_port()
            argv += ["--ready-port", str(ready_port)]
        server = self.start(name, argv, ready_port, "/readyz")
        try:
            return self.throughput(port, server, "grpc" if mode == "grpc-empty" else "http")
        finally:
            self.stop(server)

    def gateway_config(
        self, name: str, downstream_port: int, **tail: Any
    ) -> tuple[Path, dict[str, int], int]:
        """The config file, the receiver port per protocol ("http", "grpc") and the admin port."""
        ports = {"http": free_port(), "grpc": free_port()}
        admin_port = free_port()
        path = self.tmp / f"{name}.yaml"
        path.write_text(
            PIPELINE_CONFIG.format(
                host=HOST,
                port=ports["http"],
                grpc_port=ports["grpc"],
                admin_port=admin_port,
                downstream_port=downstream_port,
                extra=tail.pop("extra", ""),
                **tail,
            )
        )
        return path, ports, admin_port

    def start_gateway(self, name: str, config: Path, admin_port: int) -> Child:
        check = subprocess.run(
            [self.python, "-m", "sampler", "check-config", "--config", str(config)],
            cwd=REPO_DIR,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if check.returncode != 0:
            output = (check.stdout + check.stderr).decode(errors="replace")
            raise BenchError(f"check-config rejected the benchmark config:\n{output}")
        argv = [self.python, "-m", "sampler", "run", "--config", str(config)]
        return self.start(name, argv, admin_port, "/readyz")

    def metrics(self, admin_port: int) -> str:
        status, body = http_get(admin_port, "/metrics", timeout=5.0)
        if status != 200:
            raise BenchError(f"GET /metrics answered {status}")
        return body.decode()

    def run_gateway(self, downstream_port: int, protocol: str = "http", wal: bool = False) -> dict[str, Any]:
        fsync = self.args.wal_fsync
        durable = f", durability: wal (fsync: {fsync})" if wal else ""
        seconds = self.args.duration
        self.log(f"-- gateway over OTLP/{protocol}{durable}: full pipeline, {seconds:.0f}s of load")
        decision_wait = 2.0
        directory = tempfile.mkdtemp(prefix="wal-", dir=self.tmp)
        config, ports, admin_port = self.gateway_config(
            "gateway",
            downstream_port,
            decision_wait="2s",
            root_wait="0.5s",
            num_traces=200_000,
            max_buffered_spans=4_000_000,
            extra=f"durability: wal\nwal: {{directory: {directory}, fsync: {fsync}}}\n" if wal else "",
        )
        gateway = self.start_gateway("gateway", config, admin_port)
        try:
            result = self.throughput(ports[protocol], gateway, protocol)
            # Let the last traces reach their deadline and leave, so export counts are complete.
            cpu_before_drain = cpu_seconds(gateway.pid)
            drain_deadline = time.monotonic() + decision_wait + 8.0
            buffered: float | None = None
            while time.monotonic() < drain_deadline:
                buffered = metric_value(self.metrics(admin_port), "tailgate_buffered_spans")
                if not buffered:
                    break
                time.sleep(0.25)
            time.sleep(0.5)  # the exporter's batch timeout
            text = self.metrics(admin_port)
            result["drain_cpu_seconds"] = round(cpu_seconds(gateway.pid) - cpu_before_drain, 3)
            result["buffered_spans_after_drain"] = buffered
            result["accepted_spans"] = metric_value(
                text, "tailgate_receiver_spans_total", protocol=f"otlp_{protocol}", outcome="accepted"
            )
            result["exported_spans"] = metric_value(text, "tailgate_exporter_sent_spans_total")
            status, body = http_get(downstream_port, "/stats?reset=1", timeout=30.0)
            result["downstream"] = json.loads(body) if status == 200 else None
            return result
        finally:
            self.stop(gateway)

    def start_members(
        self, prefix: str, count: int, downstream_port: int, tail: dict[str, Any], extra: str | None = None
    ) -> list[tuple[int, int, Child]]:
        """`count` gateways, each with `extra` in its config, or, for None, as members of one cluster
        with static peers: (HTTP port, admin port, process) each. Stops them if one does not start."""
        peers = [f"{HOST}:{free_port()}" for _ in range(count)]
        started: list[tuple[int, int, Child]] = []
        try:
            for index, peer in enumerate(peers):
                cluster = (
                    f"cluster: {{endpoint: '{peer}', peers: [{', '.join(repr(p) for p in peers)}]}}\n"
                    if extra is None
                    else extra
                )
                name = f"{prefix}-{index}"
                config, ports, admin_port = self.gateway_config(name, downstream_port, extra=cluster, **tail)
                started.append((ports["http"], admin_port, self.start_gateway(name, config, admin_port)))
        except BaseException:
            for _, _, child in started:
                self.stop(child)
            raise
        return started

    def run_scaleout(self, downstream_port: int) -> dict[str, dict[str, Any]]:
        """The same load on 1 process, 2 workers (`workers: 2`) and 3 cluster members (static peers, the
        connections spread over them): spans per CPU-second of all the gateway processes together."""
        runs: dict[str, dict[str, Any]] = {}
        tail = {
            "decision_wait": "2s",
            "root_wait": "0.5s",
            "num_traces": 200_000,
            "max_buffered_spans": 4_000_000,
        }
        for name, members, extra in (
            ("1 process", 1, ""),
            ("2 workers", 1, "workers: 2\n"),
            ("3 members", 3, None),
            # Controls: the same processes without a ring (each decides what it gets, nothing forwarded),
            # which shows what running several processes on this machine costs by itself.
            ("2 independent", 2, ""),
            ("3 independent", 3, ""),
        ):
            self.log(f"-- scale-out, {name}: {self.args.duration:.0f}s of load")
            started = self.start_members("scaleout", members, downstream_port, tail, extra)
            try:
                (port, _, first), others = started[0], started[1:]
                result = self.throughput(port, first, "http", [(p, child) for p, _, child in others])
                texts = [self.metrics(admin) for _, admin, _ in started]
                received = "tailgate_receiver_spans_total"
                labels = {"protocol": "otlp_http", "outcome": "accepted"}
                accepted = sum(metric_value(text, received, **labels) or 0.0 for text in texts)
                forwarded = sum(_sum_family(text, "tailgate_cluster_forwarded_spans_total") for text in texts)
                result["forwarded_share"] = forwarded / accepted if accepted else 0.0
                runs[name] = result
            finally:
                for _, _, child in started:
                    self.stop(child)
        runs["forward cost"] = self.run_forward_cost(downstream_port, tail, runs["1 process"])
        return runs

    def run_forward_cost(
        self, downstream_port: int, tail: dict[str, Any], single: dict[str, Any]
    ) -> dict[str, Any]:
        """Two members (static peers), the load on the first only: the sender's CPU per span it forwards
        and the owner's per span it gets, each against a span handled where it arrives (`single`)."""
        self.log(f"-- scale-out, forward cost (2 members, load on one): {self.args.duration:.0f}s of load")
        started = self.start_members("forward", 2, downstream_port, tail)
        try:
            (port, sender_admin, sender), (_, _, owner) = started
            load = self.throughput(port, sender, watched=[owner])
            text = self.metrics(sender_admin)
        finally:
            for _, _, child in started:
                self.stop(child)
        spans = load["spans_ok"]
        accepted = metric_value(
            text, "tailgate_receiver_spans_total", protocol="otlp_http", outcome="accepted"
        )
        share = _sum_family(text, "tailgate_cluster_forwarded_spans_total") / accepted if accepted else 0.0
        here = 1e6 / single["spans_per_cpu_second"]  # µs per span handled where it arrives
        sender_cpu, owner_cpu = load["server_cpu_seconds_each"]
        sender_us, owner_us = sender_cpu * 1e6 / spans, owner_cpu * 1e6 / spans
        forwarded = max(share, 1e-9)
        return {
            "spans_per_second": load["spans_per_second"],
            "forwarded_share": share,
            "non_2xx": load.get("non_2xx", {}),
            "us_per_span_here": here,
            # The sender handles its own spans as a single process would; the rest is the forwarded ones'.
            "sender_us_per_forwarded_span": (sender_us - (1 - share) * here) / forwarded,
            "owner_us_per_forwarded_span": owner_us / forwarded,
        }

    def run_memory(self, downstream_port: int) -> dict[str, Any]:
        spans = self.args.memory_spans
        self.log(f"-- memory: gateway holding {spans:,} spans undecided")
        config, ports, admin_port = self.gateway_config(
            "memory",
            downstream_port,
            decision_wait="300s",
            root_wait="300s",
            num_traces=max(1_000_000, spans // 4),
            max_buffered_spans=max(4_000_000, spans * 2),
        )
        gateway = self.start_gateway("memory", config, admin_port)
        try:
            port = ports["http"]
            self.loadgen(port, ["--spans", str(WARMUP_SPANS)], deadline=60)
            before = self.settled(gateway, admin_port)
            cpu_before = cpu_seconds(gateway.pid)
            load = self.loadgen(port, ["--spans", str(spans), "--timeout", "60"], deadline=90)
            # Nothing is decided in this run, so this is the cost of ingest and buffering alone.
            server_cpu = cpu_seconds(gateway.pid) - cpu_before
            load["server_cpu_seconds"] = round(server_cpu, 3)
            load["server_cpu_utilization"] = round(server_cpu / load["seconds"], 3)
            load["spans_per_cpu_second"] = load["spans_ok"] / server_cpu if server_cpu else 0.0
            after = self.settled(gateway, admin_port)
        finally:
            self.stop(gateway)
        delta_spans = after["buffered_spans"] - before["buffered_spans"]
        delta_rss = after["rss_bytes"] - before["rss_bytes"]
        delta_bytes = (
            after["buffered_bytes"] - before["buffered_bytes"]
            if after["buffered_bytes"] is not None and before["buffered_bytes"] is not None
            else None
        )
        return {
            "before": before,
            "after": after,
            "load": load,
            "buffered_spans_added": delta_spans,
            "rss_bytes_added": delta_rss,
            "rss_bytes_per_buffered_span": delta_rss / delta_spans if delta_spans > 0 else None,
            "buffered_bytes_per_span": (
                delta_bytes / delta_spans if delta_bytes is not None and delta_spans > 0 else None
            ),
        }

    def settled(self, gateway: Child, admin_port: int) -> dict[str, Any]:
        """RSS and buffered spans once the buffered count stops moving (bounded wait)."""
        previous = None
        deadline = time.monotonic() + 15.0
        buffered: float | None = None
        text = ""
        while time.monotonic() < deadline:
            text = self.metrics(admin_port)
            buffered = metric_value(text, "tailgate_buffered_spans")
            if buffered is not None and buffered == previous:
                break
            previous = buffered
            time.sleep(0.5)
        if buffered is None:
            raise BenchError("the gateway's /metrics has no tailgate_buffered_spans")
        return {
            "buffered_spans": buffered,
            "buffered_bytes": metric_value(text, "tailgate_buffered_bytes"),
            "rss_bytes": rss_bytes(gateway.pid),
        }

    def run(self) -> dict[str, Any]:
        args = self.args
        started = time.perf_counter()
        pool = build_pool(seed=args.seed)
        save_pool(pool, self.pool_path)
        report: dict[str, Any] = {
            "environment": {
                "python": platform.python_version(),
                "protobuf": google.protobuf.__version__,
                "protobuf_backend": api_implementation.Type(),
                "cpus": os.cpu_count(),
                "connections": args.connections,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
            },
            "workload": describe(pool),
        }
        if not args.skip_empty:
            report["empty"] = self.run_probe("empty")
            if not args.skip_grpc:
                report["empty_grpc"] = self.run_probe("grpc-empty")
        if args.skip_gateway:
            report["probe"] = self.run_probe("group")
            report["gateway_skipped"] = "--skip-gateway"
        elif args.rounds < 1:
            raise BenchError("--rounds must be at least 1")
        else:
            downstream_port = free_port()
            argv = [self.python, str(BENCH_DIR / "downstream.py"), "--port", str(downstream_port)]
            downstream = self.start("downstream", argv, downstream_port, "/readyz")
            try:
                # Probe and gateway alternate, so that a burst of noise on this shared machine hits one
                # round, not one side; the round with the median ratio is reported.
                rounds: list[tuple[float, dict[str, Any], dict[str, Any], dict[str, float]]] = []
                grpc_rounds: list[tuple[float, dict[str, Any], dict[str, Any], dict[str, float]]] = []
                wal_rounds: list[tuple[float, dict[str, Any], dict[str, Any], dict[str, float]]] = []
                for _ in range(args.rounds):
                    probe = self.run_probe("group")
                    rounds.append(_versus(probe, self.run_gateway(downstream_port)))
                    if not args.skip_grpc:
                        grpc_rounds.append(_versus(probe, self.run_gateway(downstream_port, "grpc")))
                    if not args.skip_wal:
                        wal_rounds.append(_versus(probe, self.run_gateway(downstream_port, wal=True)))
                _, report["probe"], report["gateway"], report["ratio"] = _median(rounds)
                report["ratio_rounds"] = sorted(round(item[0], 3) for item in rounds)
                if grpc_rounds:
                    _, report["probe_grpc_round"], report["gateway_grpc"], report["ratio_grpc"] = _median(
                        grpc_rounds
                    )
                    report["ratio_grpc_rounds"] = sorted(round(item[0], 3) for item in grpc_rounds)
                if wal_rounds:
                    median = _median(wal_rounds)
                    _, report["probe_wal_round"], report["gateway_wal"], report["ratio_wal"] = median
                    report["ratio_wal_rounds"] = sorted(round(item[0], 3) for item in wal_rounds)
                    # Per round, the WAL gateway against the plain one measured against the same probe.
                    report["wal_cost_rounds"] = sorted(
                        round(1 - wal[0] / plain[0], 3) for plain, wal in zip(rounds, wal_rounds, strict=True)
                    )
                if not args.skip_scaleout:
                    scaleout = [self.run_scaleout(downstream_port) for _ in range(args.rounds)]
                    report["scaleout"] = _scaleout_summary(scaleout)
                if not args.skip_memory:
                    report["memory"] = self.run_memory(downstream_port)
            finally:
                self.stop(downstream)
        report["elapsed_s"] = round(time.perf_counter() - started, 1)
        return report


def _sum_family(text: str, name: str) -> float:
    """The sum of every sample of `name`, whatever its labels."""
    total = 0.0
    for line in text.splitlines():
        if line.split("{", 1)[0].split(" ", 1)[0] == name:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _versus(
    probe: dict[str, Any], gateway: dict[str, Any]
) -> tuple[float, dict[str, Any], dict[str, Any], dict[str, float]]:
    """One round: the gateway's rates as ratios to the probe measured just before it."""
    ratio = {
        "spans_per_second": gateway["spans_per_second"] / probe["spans_per_second"],
        "spans_per_cpu_second": gateway["spans_per_cpu_second"] / probe["spans_per_cpu_second"],
    }
    return ratio["spans_per_cpu_second"], probe, gateway, ratio


def _median(
    rounds: list[tuple[float, dict[str, Any], dict[str, Any], dict[str, float]]],
) -> tuple[float, dict[str, Any], dict[str, Any], dict[str, float]]:
    return sorted(rounds, key=lambda item: item[0])[len(rounds) // 2]


def _scaleout_summary(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per setup: the median round's rates, its ratio to the single process of the same round, and the
    share of spans forwarded to another process; the forward cost run of the median round."""
    summary: dict[str, Any] = {}
    costs = sorted(
        (run.pop("forward cost") for run in rounds),
        key=lambda cost: cost["sender_us_per_forwarded_span"] + cost["owner_us_per_forwarded_span"],
    )
    summary["forward_cost"] = costs[len(costs) // 2]
    for name in rounds[0]:
        ratios = sorted(
            round(run[name]["spans_per_cpu_second"] / run["1 process"]["spans_per_cpu_second"], 3)
            for run in rounds
        )
        median = sorted(rounds, key=lambda run: run[name]["spans_per_cpu_second"])[len(rounds) // 2][name]
        summary[name] = {
            "spans_per_second": median["spans_per_second"],
            "spans_per_cpu_second": median["spans_per_cpu_second"],
            "server_cpu_utilization": median["server_cpu_utilization"],
            "forwarded_share": median["forwarded_share"],
            "non_2xx": median.get("non_2xx", {}),
            "ratio_rounds": ratios,
            "ratio": ratios[len(ratios) // 2],
        }
    return summary


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    env, work = report["environment"], report["workload"]
    print(
        f"\ntailgate benchmark · Python {env['python']} · protobuf {env['protobuf']} "
        f"({env['protobuf_backend']}) · {env['cpus']} CPUs · {env['connections']} connections · "
        f"{env['duration_s']:g}s after {env['warmup_s']:g}s warm-up"
    )
    print(
        f"workload: {work['spans_per_request']} spans/request, {work['spans_per_trace']} spans/trace, "
        f"mean span {work['mean_span_bytes']:.0f} B serialized "
        f"({work['mean_body_bytes_per_span']:.0f} B of request body per span), "
        f"{work['error_trace_fraction']:.1%} error / {work['slow_trace_fraction']:.1%} slow traces\n"
    )
    header = (
        f"{'run':<26}{'spans/s (wall)':>16}{'spans/CPU-s':>14}{'server CPU':>12}"
        f"{'loadgen CPU':>13}{'p99 ms':>9}{'non-2xx':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = (
        ("empty", "empty handler (ceiling)"),
        ("empty_grpc", "gRPC empty handler"),
        ("probe", "limit probe"),
        ("gateway", "gateway (full pipeline)"),
        ("gateway_grpc", "gateway over OTLP/gRPC"),
        ("gateway_wal", "gateway, durability: wal"),
    )
    memory = report.get("memory")
    runs = [(label, report.get(key)) for key, label in rows]
    if memory:
        runs.append(("gateway, ingest only (*)", memory["load"]))
    for label, run in runs:
        if run is None:
            continue
        print(
            f"{label:<26}{_fmt(run['spans_per_second']):>16}{_fmt(run['spans_per_cpu_second']):>14}"
            f"{run['server_cpu_utilization']:>12.0%}{run['loadgen_cpu_utilization']:>13.0%}"
            f"{run['latency_ms_p99']:>9.1f}{sum(run['non_2xx'].values()):>9}"
        )
    for key, label, note in (
        ("ratio", "gateway / probe", f"goal ≥ {RATIO_GOAL}x"),
        ("ratio_grpc", "gateway over gRPC / probe", "same HTTP probe, same rounds"),
        ("ratio_wal", "gateway with WAL / probe", "same probe, same rounds"),
    ):
        ratio = report.get(key)
        if ratio:
            print(
                f"{label:<26}{ratio['spans_per_second']:>15.2f}x"
                f"{ratio['spans_per_cpu_second']:>13.2f}x   ({note})"
            )
            rounds = report.get(f"{key}_rounds", [])
            if len(rounds) > 1:
                listed = ", ".join(f"{value:.2f}" for value in rounds)
                print(f"  spans/CPU-s ratio by round (sorted): {listed}; the median round is shown above")
    scaleout = report.get("scaleout")
    if scaleout:
        print(f"\nscale-out (spans sent round-robin over the processes; goal: ratio ≥ {SCALEOUT_GOAL})")
        header = f"{'setup':<14}{'spans/s':>12}{'spans/CPU-s':>14}{'CPU':>8}{'forwarded':>11}{'non-2xx':>9}"
        print(f"{header}{'ratio':>8}  by round")
        for name, run in scaleout.items():
            if name == "forward_cost":
                continue
            rounds = ", ".join(f"{value:.2f}" for value in run["ratio_rounds"])
            refused = sum(run.get("non_2xx", {}).values())
            print(
                f"{name:<14}{_fmt(run['spans_per_second']):>12}{_fmt(run['spans_per_cpu_second']):>14}"
                f"{run['server_cpu_utilization']:>8.0%}{run['forwarded_share']:>11.0%}{refused:>9}"
                f"{run['ratio']:>8.2f}  {rounds}"
            )
        forward = scaleout.get("forward_cost")
        if forward:
            print(
                f"forward cost (2 members, load on one, {forward['forwarded_share']:.0%} forwarded, "
                f"{sum(forward['non_2xx'].values())} non-2xx): the sender spends "
                f"{forward['sender_us_per_forwarded_span']:.2f} µs of CPU per span it forwards, the owner "
                f"{forward['owner_us_per_forwarded_span']:.2f} µs per span it gets; a span handled where "
                f"it arrives costs {forward['us_per_span_here']:.2f} µs"
            )
    cost = report.get("wal_cost_rounds")
    if cost:
        listed = ", ".join(f"{value:.1%}" for value in cost)
        median_cost = cost[len(cost) // 2]
        print(f"write-ahead log cost in spans/CPU-s, by round (sorted): {listed}; median {median_cost:.1%}")
    empty = report.get("empty")
    if empty and empty["loadgen_cpu_utilization"] > 0.9:
        print("note: the load generator is saturated against the empty handler; that row is its ceiling")
    gateway = report.get("gateway")
    if gateway:
        accepted = gateway.get("accepted_spans")
        downstream = gateway.get("downstream") or {}
        kept = downstream.get("spans")
        share = f" ({kept / accepted:.1%} of accepted)" if kept is not None and accepted else ""
        print(
            f"\ngateway totals incl. warm-up: accepted {_fmt(accepted)}, exported "
            f"{_fmt(gateway.get('exported_spans'))}, downstream received {_fmt(kept)} spans{share}; "
            f"buffered after drain {_fmt(gateway.get('buffered_spans_after_drain'))}, "
            f"drain CPU {gateway['drain_cpu_seconds']:.2f}s"
        )
    if memory:
        per_span = memory["rss_bytes_per_buffered_span"]
        stored = memory["buffered_bytes_per_span"]
        overhead = (
            ""
            if per_span is None
            else (f", {per_span - work['mean_span_bytes']:,.0f} B above the serialized span")
        )
        print(
            f"memory: +{memory['buffered_spans_added']:,.0f} buffered spans, "
            f"+{memory['rss_bytes_added'] / 1e6:,.1f} MB RSS → {_fmt(per_span)} B RSS per buffered "
            f"span (goal ≤ {RSS_GOAL_BYTES} B; Go OTel Collector ≈ 460 B){overhead}; "
            f"tailgate_buffered_bytes says {_fmt(stored)} B/span"
        )
        print("(*) the memory run's load: decision_wait 300s, so nothing is decided or exported; no warm-up")
    if "gateway_skipped" in report:
        print(f"\ngateway not run: {report['gateway_skipped']}")
    print(f"\n(total {report['elapsed_s']:.0f}s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--memory-spans", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start-timeout", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3, help="probe/gateway rounds; the median is shown")
    parser.add_argument("--skip-empty", action="store_true", help="no empty-handler ceiling run")
    parser.add_argument("--skip-gateway", action="store_true")
    parser.add_argument("--skip-grpc", action="store_true", help="no OTLP/gRPC runs")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-wal", action="store_true", help="no durability: wal runs")
    parser.add_argument("--skip-scaleout", action="store_true", help="no workers / cluster runs")
    parser.add_argument("--wal-fsync", choices=["always", "batch", "never"], default="batch")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--profile", type=Path, help="record each measured server with py-spy into this directory"
    )
    args = parser.parse_args()

    # A SIGTERM to the benchmark still runs the finally below, which stops every child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="tailgate-bench-"))
    bench = Bench(args, tmp)
    try:
        report = bench.run()
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bench.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
