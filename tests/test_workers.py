"""The supervisor of `workers: N`, driving a stand-in worker program that keeps the workers' side of the
contract (announce, /metrics, SIGTERM, SIGHUP, exit status); signal tests run the supervisor as a process."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sampler.config import parse_config
from sampler.workers import (
    Supervisor,
    WorkerCommand,
    announce_worker,
    local_members,
    parse_worker_slot,
    read_announcement,
    worker_command,
    worker_peer_path,
)
from tests.conftest import ROOT, TAILGATE, Downstream, free_port, gateway_config, wait_for
from tests.otlp_data import make_request, send
from tests.test_outage import admin_port

# A worker as the supervisor sees one. argv: index, runtime directory, events file, mode. Modes: serve;
# exit2 (fail at start with status 2); fail-first-0 (worker 0's first start exits 2); ignore-term;
# wait-for-go (announce only once `<events>.go` exists). Each start, stop and SIGHUP is appended to the
# events file as `<event> <index> <pid>`.
STAND_IN = """
import os, signal, sys, threading, time
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from sampler.workers import announce_worker

index, directory, events, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]

def record(event):
    with open(events, "a") as file:
        file.write(f"{event} {index} {os.getpid()}\\n")

failed_once = f"{events}.failed-{index}"
if mode == "exit2" or (mode == "fail-first-0" and index == 0 and not os.path.exists(failed_once)):
    open(failed_once, "w").close()
    print(f"stand-in worker {index}: invalid config", file=sys.stderr)
    sys.exit(2)
registry = CollectorRegistry()
Counter("stand_in_spans", "Spans received.", ["protocol"], registry=registry).labels("otlp").inc(5)
reloads = Gauge("stand_in_reloads", "SIGHUPs received.", registry=registry)
Gauge("tailgate_build_info", "Version.", ["version"], registry=registry).labels("0.1.0").set(1)
stop = threading.Event()

def on_hup(signum, frame):
    reloads.inc()
    record("hup")

signal.signal(signal.SIGHUP, on_hup)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "ignore-term" else lambda signum, frame: stop.set())
server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
while mode == "wait-for-go" and not os.path.exists(events + ".go"):
    time.sleep(0.02)
record("start")
announce_worker(directory, index, server.server_port)
while not stop.wait(0.05):
    pass
record("stop")
server.shutdown()
"""

# The supervisor as a process: `run_supervisor` with the stand-in as the worker command.
LAUNCHER = """
import logging, sys
from sampler.config import load_config
from sampler.workers import run_supervisor

config_path, stand_in, events, mode = sys.argv[1:5]
logging.basicConfig(level="INFO", format="supervisor %(levelname)s %(name)s: %(message)s")
command = lambda index, count, directory: [sys.executable, stand_in, str(index), directory, events, mode]
sys.exit(run_supervisor(config_path, load_config(config_path), command))
"""


def config_dict(tmp_path: Path, workers: int = 2) -> dict[str, Any]:
    return {
        "receivers": {"otlp": {"http": {"endpoint": f"127.0.0.1:{free_port()}"}}},
        "admin": {"endpoint": f"127.0.0.1:{free_port()}"},
        "exporters": {"file": {"path": str(tmp_path / "kept.jsonl")}},
        "workers": workers,
        "shutdown_timeout": "1s",
    }


def events(tmp_path: Path) -> list[tuple[str, int, int]]:
    path = tmp_path / "events"
    if not path.exists():
        return []
    return [
        (event, int(index), int(pid)) for event, index, pid in map(str.split, path.read_text().splitlines())
    ]


def pids(tmp_path: Path, event: str) -> dict[int, list[int]]:
    """Pids per worker index that recorded `event`, in order."""
    found: dict[int, list[int]] = {}
    for name, index, pid in events(tmp_path):
        if name == event:
            found.setdefault(index, []).append(pid)
    return found


def stand_in_command(tmp_path: Path, mode: str = "serve") -> WorkerCommand:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return lambda index, count, directory: [
        sys.executable,
        str(script),
        str(index),
        directory,
        str(tmp_path / "events"),
        mode,
    ]


def sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as reply:
        return reply.status, await reply.text()


async def wait_ready(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the supervisor exited"
        try:
            if (await get(port, "/readyz"))[0] == 200:
                return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the supervisor did not become ready")


SupervisorFactory = Callable[..., Awaitable[Supervisor]]


@pytest.fixture
async def start_supervisor(tmp_path: Path) -> AsyncIterator[SupervisorFactory]:
    """Supervisors in this test's event loop, with the stand-in as their worker; stopped at the end."""
    started: list[Supervisor] = []

    async def start(mode: str = "serve", workers: int = 2) -> Supervisor:
        config = parse_config(config_dict(tmp_path, workers))
        supervisor = Supervisor("unused.yaml", config, stand_in_command(tmp_path, mode))
        started.append(supervisor)
        await supervisor.start()
        return supervisor

    yield start
    for supervisor in started:
        if not supervisor.stopping:
            await supervisor.stop()


def supervisor_process(tmp_path: Path, mode: str = "serve") -> tuple[list[str], int, Path]:
    """The command line of a supervisor process, its admin port, and the TMPDIR it makes its runtime
    directory in."""
    config = config_dict(tmp_path)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    stand_in = tmp_path / "stand_in.py"
    stand_in.write_text(STAND_IN)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    command = [sys.executable, str(launcher), str(config_path), str(stand_in), str(tmp_path / "events"), mode]
    return command, admin_port(config), runtime


def popen(command: list[str], runtime: Path, **options: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TMPDIR": str(runtime)}, **options)


def run_to_end(command: list[str], runtime: Path) -> subprocess.CompletedProcess[str]:
    """Run the supervisor as popen does, to its exit, with its output as text."""
    return subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_worker_contract_helpers(tmp_path: Path) -> None:
    directory = str(tmp_path)
    assert worker_command("c.yaml", 1, 4, directory) == [
        sys.executable,
        "-m",
        "sampler",
        "run",
        "--config",
        "c.yaml",
        "--worker",
        "1/4",
        "--worker-dir",
        directory,
        "--supervisor",
        str(os.getpid()),
    ]
    assert parse_worker_slot("1/4") == (1, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"INDEX|COUNT"):
            parse_worker_slot(bad)
    assert local_members(directory, 2) == [f"unix:{worker_peer_path(directory, i)}" for i in range(2)]
    assert read_announcement(directory, 1) is None
    announce_worker(directory, 1, 12345)
    assert read_announcement(directory, 1) == (os.getpid(), 12345)
    assert sorted(os.listdir(directory)) == ["worker-1.json"]


async def test_ready_once_every_worker_announced_and_a_reload_waits_for_it(
    tmp_path: Path, start_supervisor: SupervisorFactory
) -> None:
    supervisor = await start_supervisor("wait-for-go")
    assert supervisor.port is not None
    assert await get(supervisor.port, "/healthz") == (200, "ok\n")
    await wait_for(lambda: all(worker.alive for worker in supervisor.workers))
    assert (await get(supervisor.port, "/readyz"))[0] == 503
    # Workers still starting get the SIGHUP once they announce, not before (it would kill them).
    supervisor.reload()
    (tmp_path / "events.go").touch()
    await wait_ready(supervisor.port)
    await wait_for(lambda: sorted(pids(tmp_path, "hup")) == [0, 1])
    assert pids(tmp_path, "hup") == pids(tmp_path, "start")


async def test_metrics_are_the_sum_of_the_workers_and_the_supervisors_own(
    start_supervisor: SupervisorFactory,
) -> None:
    supervisor = await start_supervisor(workers=3)
    assert supervisor.port is not None
    await wait_ready(supervisor.port)
    status, text = await get(supervisor.port, "/metrics")
    assert status == 200
    assert sample(text, "stand_in_spans_total", protocol="otlp") == 15
    assert sample(text, "tailgate_build_info", version="0.1.0") == 1
    assert sample(text, "tailgate_workers") == 3
    assert sample(text, "tailgate_workers_alive") == 3
    assert sample(text, "tailgate_worker_restarts_total") == 0
    assert sample(text, "tailgate_worker_scrape_failures_total") == 0


async def test_a_killed_worker_is_restarted_and_its_counts_are_kept(
    tmp_path: Path, start_supervisor: SupervisorFactory
) -> None:
    supervisor = await start_supervisor()
    assert supervisor.port is not None
    await wait_ready(supervisor.port)
    _, text = await get(supervisor.port, "/metrics")
    assert sample(text, "stand_in_spans_total", protocol="otlp") == 10
    killed = supervisor.workers[0].pid
    assert killed is not None
    os.kill(killed, signal.SIGKILL)
    await wait_for(lambda: len(pids(tmp_path, "start").get(0, [])) == 2)
    await wait_ready(supervisor.port)
    restarted = supervisor.workers[0].pid
    assert restarted not in (None, killed)
    assert read_announcement(supervisor.directory, 0) == (restarted, supervisor.workers[0].admin_port)
    _, text = await get(supervisor.port, "/metrics")
    assert sample(text, "tailgate_worker_restarts_total") == 1
    assert sample(text, "tailgate_workers_alive") == 2
    # What the killed worker had counted stays in the total: 5 from it, 5 from each running worker.
    assert sample(text, "stand_in_spans_total", protocol="otlp") == 15


async def test_a_worker_failing_its_first_start_is_started_again_while_another_runs(
    tmp_path: Path, start_supervisor: SupervisorFactory
) -> None:
    supervisor = await start_supervisor("fail-first-0")
    assert supervisor.port is not None
    await wait_ready(supervisor.port)
    assert supervisor.start_failure is None
    assert sorted(pids(tmp_path, "start")) == [0, 1]
    _, text = await get(supervisor.port, "/metrics")
    assert sample(text, "tailgate_worker_restarts_total") == 1


async def test_a_worker_waiting_to_be_started_again_does_not_fail_a_clean_stop(
    tmp_path: Path, start_supervisor: SupervisorFactory
) -> None:
    """Stopped while worker 0 waits out its backoff after a failed start: the workers running then exit
    cleanly, so the stop does (the failure was logged and counted when it happened)."""
    supervisor = await start_supervisor("fail-first-0")
    await wait_for(lambda: supervisor.workers[0].first_start_status == 2)
    assert not supervisor.workers[0].alive
    assert await supervisor.stop() == 0
    assert pids(tmp_path, "start").keys() == {1}  # worker 0 was not started again


async def test_workers_that_ignore_sigterm_are_killed_after_the_timeout(
    tmp_path: Path, start_supervisor: SupervisorFactory
) -> None:
    supervisor = await start_supervisor("ignore-term")
    assert supervisor.port is not None
    await wait_ready(supervisor.port)
    supervisor.stop_timeout = 0.3
    assert await supervisor.stop() == 1
    assert [worker.process.returncode for worker in supervisor.workers if worker.process] == [
        -signal.SIGKILL
    ] * 2
    assert not await asyncio.to_thread(os.path.exists, supervisor.directory)


async def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(tmp_path: Path) -> None:
    command, admin_port, runtime = supervisor_process(tmp_path)
    process = popen(command, runtime)
    try:
        await wait_ready(admin_port, process)
        started = pids(tmp_path, "start")
        assert sorted(started) == [0, 1]
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 20)
    finally:
        if process.poll() is None:
            process.kill()
    assert returncode == 0
    assert pids(tmp_path, "stop") == started
    for [pid] in started.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert list(runtime.iterdir()) == []  # the runtime directory is gone


async def test_sighup_is_forwarded_to_every_worker(tmp_path: Path) -> None:
    command, admin_port, runtime = supervisor_process(tmp_path)
    process = popen(command, runtime)
    try:
        await wait_ready(admin_port, process)
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: sorted(pids(tmp_path, "hup")) == [0, 1])
        assert pids(tmp_path, "hup") == pids(tmp_path, "start")
        _, text = await get(admin_port, "/metrics")
        assert sample(text, "stand_in_reloads") == 2
        assert sample(text, "tailgate_worker_restarts_total") == 0
        process.send_signal(signal.SIGTERM)
        returncode = await asyncio.to_thread(process.wait, 20)
    finally:
        if process.poll() is None:
            process.kill()
    assert returncode == 0


def test_every_worker_failing_its_first_start_with_status_2_exits_2(tmp_path: Path) -> None:
    command, _, runtime = supervisor_process(tmp_path, "exit2")
    result = run_to_end(command, runtime)
    assert result.returncode == 2, result.stderr
    assert "stand-in worker 0: invalid config" in result.stderr
    assert "tailgate: no worker could start" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(runtime.iterdir()) == []


def test_an_admin_port_in_use_is_a_start_error(tmp_path: Path) -> None:
    command, admin_port, runtime = supervisor_process(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", admin_port))
        taken.listen()
        result = run_to_end(command, runtime)
    assert result.returncode == 1, result.stderr
    assert "tailgate: cannot start" in result.stderr
    assert "Traceback" not in result.stderr
    assert events(tmp_path) == []  # no worker was started
    assert list(runtime.iterdir()) == []


async def test_a_worker_whose_supervisor_died_while_it_started_stops_once_started(
    tmp_path: Path, downstream: Downstream
) -> None:
    """The supervisor names itself on the worker's command line: a worker whose parent is not (or no
    longer) that process stops rather than hold the ports on its own, even when the supervisor died
    before the worker could watch it (its parent is then another process from the start)."""
    config = {**gateway_config(downstream), "workers": 2}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    gone = subprocess.Popen(["true"])
    gone.wait()
    directory = tmp_path / "run"
    directory.mkdir()
    command = worker_command(str(path), 0, 2, str(directory))
    command[command.index("--supervisor") + 1] = str(gone.pid)
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _, stderr = await asyncio.to_thread(process.communicate, None, 30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert f"the supervisor (pid {gone.pid}) is gone; shutting down" in stderr


async def test_a_slow_scrape_answered_last_does_not_put_older_counts_in_the_totals(tmp_path: Path) -> None:
    """Two /metrics requests at once (two Prometheus servers): the worker's counts kept for when it exits
    are those of the later scrape, whichever answer comes back last."""
    answers = [(0.3, 100), (0.0, 500)]  # the first scrape is answered last

    async def metrics(request: web.Request) -> web.Response:
        delay, decided = answers.pop(0)
        await asyncio.sleep(delay)
        text = f"# TYPE tailgate_traces_decided_total counter\ntailgate_traces_decided_total {decided}\n"
        return web.Response(text=text)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    config = parse_config(config_dict(tmp_path, workers=2))
    supervisor = Supervisor(str(tmp_path / "config.yaml"), config)
    supervisor.directory = str(tmp_path)
    supervisor._session = aiohttp.ClientSession()
    worker = supervisor.workers[0]
    worker.generation, worker.admin_port = 1, port
    try:
        first = asyncio.ensure_future(supervisor.metrics_text())
        await asyncio.sleep(0.1)
        second = await supervisor.metrics_text()
        assert sample(second, "tailgate_traces_decided_total") == 500
        assert sample(await first, "tailgate_traces_decided_total") == 100
        supervisor._retire(worker, 1)  # the worker exits: its last counts stay in the totals
        assert sample(await supervisor.metrics_text(), "tailgate_traces_decided_total") == 500
    finally:
        await supervisor._session.close()
        await runner.cleanup()


# -- the supervisor with real workers (`python -m sampler run`) ------------------------------------------


@pytest.fixture
def hanging_downstream() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers: exports hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


def gateway_dict(tmp_path: Path, downstream_port: int | None = None, **overrides: Any) -> dict[str, Any]:
    """A `workers: 2` gateway keeping every trace until it stops, exporting to `downstream_port` over
    OTLP/HTTP, or to a file."""
    exporters = (
        {"file": {"path": str(tmp_path / "kept.jsonl")}}
        if downstream_port is None
        else {
            "otlp_http": {
                "endpoint": f"http://127.0.0.1:{downstream_port}/v1/traces",
                "batch": {"timeout": "0.02s"},
            }
        }
    )
    config: dict[str, Any] = {
        **config_dict(tmp_path),
        "exporters": exporters,
        "tail_sampling": {
            "decision_wait": "300s",
            "decision_wait_after_root_received": "300s",
            "policies": [{"name": "all", "type": "always_sample"}],
        },
    }
    config.update(overrides)
    return config


def gateway_process(tmp_path: Path, config: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path, int]:
    """`tailgate run` on `config` (written to tmp_path): the process, its stderr log and admin port."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*TAILGATE, "run", "--config", str(path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr
        )
    return process, log, admin_port(config)


async def stop_gateway(process: subprocess.Popen[bytes], timeout: float = 30) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(process.wait, timeout)
    finally:
        if process.poll() is None:
            process.kill()


async def reloads_applied(admin_port: int) -> float | None:
    return sample((await get(admin_port, "/metrics"))[1], "tailgate_config_reloads_total", result="applied")


@pytest.mark.parametrize("reload", ["sighup", "watch", "watch, then the file invalid", "watch, then no file"])
async def test_a_reloaded_shutdown_timeout_is_what_the_supervisor_gives_its_workers(
    tmp_path: Path, hanging_downstream: int, reload: str
) -> None:
    """shutdown_timeout is reloaded with the workers (on SIGHUP, or as they watch the file): the
    supervisor gives them the new one to stop, not the one it started with, before it kills them; also
    when the file no longer loads by then, and the workers keep running what they reloaded."""
    config = gateway_dict(tmp_path, hanging_downstream, shutdown_timeout="1s")
    if reload.startswith("watch"):
        config["reload"] = {"watch": True, "interval": "0.1s"}
    process, log, admin = gateway_process(tmp_path, config)
    try:
        await wait_ready(admin, process)
        # Over the supervisor's first 1 s + 5 s: a worker flushing to a downstream that never answers
        # takes all of it.
        config["shutdown_timeout"] = "7s"
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        if reload == "sighup":
            process.send_signal(signal.SIGHUP)
        for _ in range(400):
            if await reloads_applied(admin) == 2:
                break
            await asyncio.sleep(0.05)
        assert await reloads_applied(admin) == 2, "both workers applied the reload"
        if reload == "watch, then the file invalid":
            (tmp_path / "config.yaml").write_text("workers: [unclosed\n")
        elif reload == "watch, then no file":
            (tmp_path / "config.yaml").unlink()
        url = f"http://{config['receivers']['otlp']['http']['endpoint']}/v1/traces"
        for _ in range(4):  # each on a new connection: both workers end up holding traces
            await send(url, make_request(20, 3))
        returncode = await stop_gateway(process, 40)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = log.read_text()
    assert "killing it" not in stderr, stderr[-3000:]
    assert returncode == 0, stderr[-3000:]


async def test_a_reload_of_the_same_file_warns_about_nothing(tmp_path: Path) -> None:
    """Each worker runs with the admin endpoint and max_memory of its own: a SIGHUP with the file as it
    was warns of no setting that needs a restart."""
    config = gateway_dict(tmp_path, memory={"max_memory": "64MiB"})
    process, log, admin = gateway_process(tmp_path, config)
    try:
        await wait_ready(admin, process)
        process.send_signal(signal.SIGHUP)
        await wait_for(lambda: log.read_text().count("config reload: applied") == 2)
        returncode = await stop_gateway(process)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = log.read_text()
    assert returncode == 0, stderr[-3000:]
    assert "need a restart to change" not in stderr, [
        line for line in stderr.splitlines() if "restart" in line
    ]


def test_a_start_error_of_every_worker_exits_1_as_one_process_does(tmp_path: Path) -> None:
    """A receiver certificate that cannot be read is a start error (exit 1) for one process; with
    `workers: 2` every worker fails its first start that way, and the supervisor exits 1 too rather than
    start them again forever."""
    missing = tmp_path / "missing.crt"
    config = gateway_dict(tmp_path)
    config["receivers"]["otlp"]["http"]["tls"] = {"cert_file": str(missing), "key_file": str(missing)}
    for workers in (1, 2):
        path = tmp_path / f"workers-{workers}.yaml"
        path.write_text(yaml.safe_dump({**config, "workers": workers}))
        result = subprocess.run(
            [*TAILGATE, "run", "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, (workers, result.stderr[-3000:])
        assert str(missing) in result.stderr
    assert "tailgate: no worker could start: each exited at its first start, with status 1" in result.stderr
    assert result.stderr.count("starting it again") <= 1  # the first to fail, while the other started


async def test_a_receiver_port_another_gateway_listens_on_is_a_start_error(tmp_path: Path) -> None:
    """The workers of one gateway share its receiver ports (SO_REUSEPORT); a second `workers: 2` gateway
    on the same receiver port (its own admin port) must not take half its connections, splitting traces
    between two rings: it exits 1 naming the port, as one process would."""
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    first_config = gateway_dict(first_dir)
    second_config = {**gateway_dict(second_dir), "receivers": first_config["receivers"]}
    first, _, first_admin = gateway_process(first_dir, first_config)
    try:
        await wait_ready(first_admin, first)
        second, second_log, _ = gateway_process(second_dir, second_config)
        try:
            returncode = await asyncio.to_thread(second.wait, 30)
        finally:
            if second.poll() is None:
                second.kill()
        endpoint = first_config["receivers"]["otlp"]["http"]["endpoint"]
        assert returncode == 1
        assert f"tailgate: cannot start: receiver endpoint {endpoint} is in use" in second_log.read_text()
        assert await stop_gateway(first) == 0
    finally:
        if first.poll() is None:
            first.kill()


async def test_each_worker_keeps_to_its_share_of_max_memory(tmp_path: Path) -> None:
    """memory.max_memory holds for the gateway: each of N workers keeps to max_memory / N, and the merged
    tailgate_memory_limit_bytes is max_memory."""
    config = gateway_dict(tmp_path, memory={"max_memory": "64MiB"})
    process, _, admin = gateway_process(tmp_path, config)
    try:
        await wait_ready(admin, process)
        text = (await get(admin, "/metrics"))[1]
        assert await stop_gateway(process) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert sample(text, "tailgate_memory_limit_bytes") == 64 * 1024 * 1024


def test_two_receivers_on_one_port_are_a_start_error_with_workers(tmp_path: Path) -> None:
    """OTLP/HTTP and Zipkin on one port: one process cannot bind the second (exit 1); with `workers: 2`
    both bound with SO_REUSEPORT and the kernel spread OTLP connections over the Zipkin listener too."""
    endpoint = f"127.0.0.1:{free_port()}"
    config = gateway_dict(tmp_path)
    config["receivers"] = {"otlp": {"http": {"endpoint": endpoint}}, "zipkin": {"endpoint": endpoint}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [*TAILGATE, "run", "--config", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"tailgate: cannot start: receiver endpoint {endpoint} is in use" in result.stderr
