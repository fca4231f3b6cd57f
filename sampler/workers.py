"""The supervisor of `workers: N`: N gateway processes serving the same receiver ports, started again when
they exit, stopped and reloaded together, their `/metrics` served merged on the admin endpoint.

Contract with the workers:

- The supervisor creates a private runtime directory D (removed when it exits) and starts worker i of N
  as `python -m sampler run --config C --worker i/N --worker-dir D` (`worker_command`), directly, without
  a shell, so that the pid it sees is the worker's. stdin is /dev/null; stdout and stderr are the
  supervisor's. `parse_worker_slot` parses the `--worker` value.
- The worker serves everything config C says except the admin endpoint, which it binds on 127.0.0.1:0:
  config.admin.endpoint belongs to the supervisor. It listens for spans forwarded by the other workers on
  the unix socket `worker_peer_path(D, i)` (removing a stale file there first); `local_members(D, N)`
  lists every worker's socket, `unix:<path>`, in worker order.
- Once started (receivers bound, admin endpoint up), the worker calls `announce_worker(D, i, admin_port,
  shutdown_timeout)`, which writes `D/worker-{i}.json` = {"pid", "admin_port", "shutdown_timeout"}
  atomically, and again after each reload it applied. The supervisor scrapes
  http://127.0.0.1:<admin_port>/metrics from then on and counts the worker ready; at stop it gives each
  worker the longest shutdown_timeout announced, plus SHUTDOWN_GRACE, before it kills it.
- SIGTERM (or SIGINT): shut down cleanly and exit 0. SIGHUP: reload the config; the supervisor sends it
  only to workers that have announced (one still starting gets it once it announces).
- Exit status 2: config error; 1: cannot start (e.g. a port cannot be bound), as `tailgate run` exits.
  Any exit the supervisor did not ask for starts the worker again with the same index after a backoff;
  when the first start of every worker exits with an error status, the supervisor gives up and exits 2
  (each a config error) or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from pydantic import ByteSize

from sampler.admin import AdminServer
from sampler.config import AdminConfig, Config, load_config
from sampler.errors import TailgateError
from sampler.logthrottle import LogThrottle
from sampler.metrics_merge import cumulative, merge_families, parse_exposition, render

log = logging.getLogger(__name__)

# As `tailgate run` exits.
EXIT_START_ERROR = 1
EXIT_CONFIG_ERROR = 2
# A worker that exited is started again after FIRST_BACKOFF, doubling up to MAX_BACKOFF while it keeps
# exiting; back to FIRST_BACKOFF once a start has run for BACKOFF_RESET_AFTER.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
BACKOFF_RESET_AFTER = 30.0
# On shutdown, workers get shutdown_timeout plus this to exit before they are killed.
SHUTDOWN_GRACE = 5.0
# A worker that does not answer /metrics within this is left out of the merged reply.
SCRAPE_TIMEOUT = 2.0
ANNOUNCE_POLL_INTERVAL = 0.05

# (index, count, runtime directory) → the command line of a worker process.
WorkerCommand = Callable[[int, int, str], list[str]]


def worker_command(config_path: str, index: int, count: int, directory: str) -> list[str]:
    """The command line of worker `index` of `count`: `tailgate run` with the worker flags."""
    return [
        sys.executable,
        "-m",
        "sampler",
        "run",
        "--config",
        config_path,
        "--worker",
        f"{index}/{count}",
        "--worker-dir",
        directory,
        # Named, not read as the worker's parent: one whose supervisor died while it started stops too.
        "--supervisor",
        str(os.getpid()),
    ]


def parse_worker_slot(text: str) -> tuple[int, int]:
    """`--worker i/N` → (i, N), 0 <= i < N; an argparse type."""
    index, _, count = text.partition("/")
    try:
        slot = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= slot[0] < slot[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: the index must be in 0..COUNT-1")
    return slot


def announcement_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"worker-{index}.json")


def worker_peer_path(directory: str, index: int) -> str:
    """The unix socket worker `index` listens on for spans forwarded by the other workers."""
    return os.path.join(directory, f"peer-{index}.sock")


def local_members(directory: str, count: int) -> list[str]:
    """Every worker's peer socket as a member id, `unix:<path>`, in worker order."""
    return [f"unix:{worker_peer_path(directory, index)}" for index in range(count)]


def worker_config(config: Config, count: int) -> Config:
    """What one worker of `count` runs: the supervisor serves the admin endpoint (a worker's own is on an
    ephemeral port), and `memory.max_memory` holds for the gateway, so each worker keeps to an even share
    of it (the ring spreads the traces evenly)."""
    memory = config.memory
    if memory.max_memory is not None:
        memory = memory.model_copy(update={"max_memory": ByteSize(max(1, memory.max_memory // count))})
    return config.model_copy(update={"admin": AdminConfig(endpoint="127.0.0.1:0"), "memory": memory})


def announce_worker(
    directory: str, index: int, admin_port: int, shutdown_timeout: float | None = None
) -> None:
    """Tell the supervisor that this worker is serving, where its admin endpoint is and, when given, the
    shutdown_timeout it runs by (announced again after each reload)."""
    path = announcement_path(directory, index)
    staging = f"{path}.{os.getpid()}.tmp"
    announcement: dict[str, float] = {"pid": os.getpid(), "admin_port": admin_port}
    if shutdown_timeout is not None:
        announcement["shutdown_timeout"] = shutdown_timeout
    with open(staging, "w") as file:
        json.dump(announcement, file)
    # A rename: the supervisor never reads a half-written file.
    os.replace(staging, path)


def read_announcement(directory: str, index: int) -> tuple[int, int] | None:
    """(pid, admin port) announced by worker `index`; None if it has not announced."""
    try:
        with open(announcement_path(directory, index)) as file:
            announced = json.load(file)
        return int(announced["pid"]), int(announced["admin_port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def announced_shutdown_timeout(directory: str, index: int) -> float | None:
    """The shutdown_timeout worker `index` last announced it runs by; None if it did not."""
    try:
        with open(announcement_path(directory, index)) as file:
            return float(json.load(file)["shutdown_timeout"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_status(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit status {status}"


@dataclass
class WorkerSlot:
    """Worker `index` and its current process; a process that exits is replaced by a new one."""

    index: int
    process: asyncio.subprocess.Process | None = None
    # Processes started so far; 1 while the first start runs.
    generation: int = 0
    # Set once the current process announced; cleared when it exits.
    admin_port: int | None = None
    # The current process's last /metrics that parsed; its counters join `Supervisor.retired` at exit.
    last_families: list[Metric] = field(default_factory=list)
    # The number of the /metrics request `last_families` came from: one answered later but asked
    # earlier (two scrapers at once) does not replace newer counts with older ones.
    last_scrape: int = -1
    backoff: float = FIRST_BACKOFF
    # SIGHUP arrived while the current process was still starting: sent once it announces.
    reload_pending: bool = False
    # The exit status of the first start when it exited without announcing.
    first_start_status: int | None = None
    # Whether the last process exited 0, or by the supervisor's SIGTERM before it served anything.
    exited_cleanly: bool = True

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    """Starts `config.workers` worker processes, keeps them running, and serves the admin endpoint."""

    def __init__(self, config_path: str, config: Config, command: WorkerCommand | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.count = config.workers
        self.command = command or partial(worker_command, config_path)
        # The workers' shutdown_timeout (reloaded with them) plus SHUTDOWN_GRACE.
        self.stop_timeout = config.shutdown_timeout + SHUTDOWN_GRACE
        self.workers = [WorkerSlot(index) for index in range(self.count)]
        self.directory = ""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Gauge("tailgate_workers", "Worker processes configured (`workers`).", registry=r).set(self.count)
        alive = Gauge("tailgate_workers_alive", "Worker processes running.", registry=r)
        alive.set_function(lambda: sum(worker.alive for worker in self.workers))
        self.restarts = Counter(
            "tailgate_worker_restarts", "Worker processes started again after one exited.", registry=r
        )
        self.scrape_failures = Counter(
            "tailgate_worker_scrape_failures",
            "Worker /metrics scrapes that failed, timed out or did not parse; their gauges were left out.",
            registry=r,
        )
        # Counters, histograms and summaries of worker processes that have exited, as last scraped: the
        # merged totals keep them so that they never go back when a worker is replaced.
        self.retired: list[Metric] = []
        self._scrapes = 0  # /metrics requests so far
        # Set when the first start of every worker failed: the supervisor gives up, exiting with
        # `start_failure_status`.
        self.start_failure: str | None = None
        self.start_failure_status = EXIT_START_ERROR
        self.stopping = False
        self._stop_requested = asyncio.Event()
        self._supervising: list[asyncio.Task[None]] = []
        self._watcher: asyncio.Task[None] | None = None
        self.admin = AdminServer(config.admin.endpoint, self._render_metrics, lambda: self.ready)
        self._session: aiohttp.ClientSession | None = None
        self._scrape_warnings = LogThrottle()
        self.port: int | None = None

    @property
    def ready(self) -> bool:
        return not self._stop_requested.is_set() and all(
            w.alive and w.admin_port is not None for w in self.workers
        )

    async def start(self) -> None:
        check_ports_free(receiver_endpoints(self.config))
        self.directory = tempfile.mkdtemp(prefix="tailgate-")
        await self.admin.start()
        self.port = self.admin.port
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT))
        self._supervising = [asyncio.create_task(self._supervise(worker)) for worker in self.workers]
        self._watcher = asyncio.create_task(self._watch_announcements())
        log.info("supervising %d workers (runtime directory %s)", self.count, self.directory)

    async def stop(self) -> int:
        """SIGTERM every worker, SIGKILL what is left after `stop_timeout`; 0 if every worker running then
        exited cleanly (one waiting to be started again had its exit logged already)."""
        self.stopping = True
        self._stop_requested.set()
        stopped = [worker for worker in self.workers if worker.alive]
        # What each worker runs by now, reloaded or not (on SIGHUP, or as it watches the file, which may
        # not load any more): the longest.
        for worker in stopped:
            announced = announced_shutdown_timeout(self.directory, worker.index)
            if announced is not None:
                self.stop_timeout = max(self.stop_timeout, announced + SHUTDOWN_GRACE)
        for worker in self.workers:
            self._signal(worker, signal.SIGTERM)
        if self._supervising:
            _, running = await asyncio.wait(self._supervising, timeout=self.stop_timeout)
            if running:
                for worker in self.workers:
                    if worker.alive:
                        log.warning(
                            "worker %d (pid %s) did not exit within %.1f s: killing it",
                            worker.index,
                            worker.pid,
                            self.stop_timeout,
                        )
                        self._signal(worker, signal.SIGKILL)
                await asyncio.wait(running)
            for task in self._supervising:
                if not task.cancelled() and task.exception() is not None:
                    log.error("supervising a worker failed", exc_info=task.exception())
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        if self._session is not None:
            await self._session.close()
        await self.admin.stop()
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        log.info("workers stopped")
        return 0 if all(worker.exited_cleanly for worker in stopped) else EXIT_START_ERROR

    async def run_until_signalled(self) -> int:
        """Supervise until SIGTERM or SIGINT, forwarding SIGHUP; the exit status for the command."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
        except BaseException:
            await self.stop()  # release the admin port and the runtime directory before reporting
            raise
        await self._stop_requested.wait()
        if self.start_failure is None:
            log.info("shutdown requested")
        status = await self.stop()
        return self.start_failure_status if self.start_failure is not None else status

    def reload(self) -> None:
        """Forward SIGHUP (reload the config) to every worker that is serving; one still starting gets
        it once it announces, a worker not running reads the config when it starts. The supervisor takes
        the settings it runs by itself from the file too: the workers' shutdown_timeout, the log level."""
        log.info("reloading the workers' config")
        stop_timeout = self._reread_config()
        if stop_timeout is not None:
            self.stop_timeout = stop_timeout
        for worker in self.workers:
            if worker.admin_port is not None:
                self._signal(worker, signal.SIGHUP)
            elif worker.alive:
                worker.reload_pending = True

    def _reread_config(self) -> float | None:
        """Read the config file as it is now for the settings the supervisor runs by: its log level is
        applied, and its shutdown_timeout plus SHUTDOWN_GRACE returned. None when it does not load: the
        workers keep running the config they have (each logs why)."""
        try:
            config = load_config(self.config_path)
        except Exception:  # whatever is wrong with the file, each worker reports it
            return None
        logging.getLogger().setLevel(config.log_level.upper())
        return config.shutdown_timeout + SHUTDOWN_GRACE

    async def metrics_text(self) -> str:
        """The supervisor's metrics and every announced worker's, merged."""
        number = self._scrapes = self._scrapes + 1
        polled = [
            (worker, worker.generation, worker.admin_port)
            for worker in self.workers
            if worker.admin_port is not None
        ]
        texts = await asyncio.gather(*(self._scrape(worker.index, port) for worker, _, port in polled))
        parsed = await asyncio.to_thread(_parse_each, texts)
        # From here to the merge, no await: a worker that exits meanwhile is either in the list below or
        # (its last scrape) in `retired`, never both, never neither.
        expositions = [parse_exposition(generate_latest(self.registry).decode()), self.retired]
        for (worker, generation, _), families in zip(polled, parsed, strict=True):
            if families is None:
                self.scrape_failures.inc()
            if worker.generation != generation or worker.admin_port is None:
                continue  # exited since: its last scrape is in `retired`
            if families is None:
                # Its gauges are left out; its counters stay as last scraped, so the totals do not dip.
                expositions.append(cumulative(worker.last_families))
            else:
                if number > worker.last_scrape:
                    worker.last_families, worker.last_scrape = families, number
                expositions.append(families)
        return await asyncio.to_thread(lambda: render(merge_families(expositions)))

    async def _scrape(self, index: int, port: int | None) -> str | None:
        assert self._session is not None
        try:
            async with self._session.get(f"http://127.0.0.1:{port}/metrics") as reply:
                if reply.status == 200:
                    return await reply.text()
                problem = f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError) as error:
            problem = str(error) or type(error).__name__
        if self._scrape_warnings.allow():
            log.warning("worker %d (admin port %s) /metrics: %s", index, port, problem)
        return None

    async def _supervise(self, worker: WorkerSlot) -> None:
        """Run worker `index`, and start it again after a backoff whenever it exits unasked."""
        while not self._stop_requested.is_set():
            if worker.generation > 0:
                self.restarts.inc()
            worker.generation += 1
            worker.reload_pending = False
            started = time.monotonic()
            status = await self._run_process(worker)
            ran = time.monotonic() - started
            announced = self._retire(worker, status)
            if self._stop_requested.is_set():
                return
            if worker.generation == 1 and not announced:
                worker.first_start_status = status
                if self._every_first_start_failed():
                    return
            if ran >= BACKOFF_RESET_AFTER:
                worker.backoff = FIRST_BACKOFF
            delay = worker.backoff
            worker.backoff = min(delay * 2, MAX_BACKOFF)
            log.error(
                "worker %d (pid %s) exited (%s) after %.1f s; starting it again in %.1f s",
                worker.index,
                worker.pid,
                describe_status(status),
                ran,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)

    async def _run_process(self, worker: WorkerSlot) -> int:
        """Start the worker's process and wait for it to exit; its exit status."""
        command = self.command(worker.index, self.count, self.directory)
        try:
            worker.process = await asyncio.create_subprocess_exec(*command, stdin=asyncio.subprocess.DEVNULL)
        except OSError as error:
            log.error("worker %d: cannot run %s: %s", worker.index, command[0], error)
            worker.process = None
            return EXIT_START_ERROR
        if self.stopping:
            self._signal(worker, signal.SIGTERM)  # started while stop() was signalling the others
        log.debug("worker %d started (pid %d)", worker.index, worker.process.pid)
        return await worker.process.wait()

    def _retire(self, worker: WorkerSlot, status: int) -> bool:
        """Book the exit of the worker's process; whether it had announced."""
        announced = worker.admin_port is not None or self._announced_port(worker) is not None
        worker.exited_cleanly = status == 0 or (status == -signal.SIGTERM and not announced)
        worker.admin_port = None
        if worker.last_families:
            self.retired = merge_families([self.retired, cumulative(worker.last_families)])
            worker.last_families = []
        for path in (
            announcement_path(self.directory, worker.index),
            worker_peer_path(self.directory, worker.index),
        ):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return announced

    def _every_first_start_failed(self) -> bool:
        """Whether the first start of every worker exited with an error status (a config error, or one
        that keeps it from starting: a certificate it cannot read, a port it cannot bind): then the
        supervisor gives up, exiting 2 when each exit was a config error and 1 otherwise, as one process
        would. A worker killed by a signal at its start is started again."""
        statuses = sorted({worker.first_start_status or 0 for worker in self.workers})
        if statuses[0] <= 0:  # one has not exited yet, exited 0, or was killed by a signal
            return False
        self.start_failure_status = EXIT_CONFIG_ERROR if statuses == [EXIT_CONFIG_ERROR] else EXIT_START_ERROR
        self.start_failure = (
            "no worker could start: each exited at its first start, with status "
            + " or ".join(map(str, statuses))
        )
        self._stop_requested.set()
        return True

    def _announced_port(self, worker: WorkerSlot) -> int | None:
        """The admin port the worker's current process announced, if it has."""
        announced = read_announcement(self.directory, worker.index)
        if announced is None or worker.process is None or announced[0] != worker.process.pid:
            return None  # not yet, or left by the process before it
        return announced[1]

    async def _watch_announcements(self) -> None:
        while True:
            for worker in self.workers:
                if worker.admin_port is None and worker.alive:
                    worker.admin_port = self._announced_port(worker)
                    if worker.admin_port is None:
                        continue
                    log.info(
                        "worker %d ready (pid %s, admin port %d)", worker.index, worker.pid, worker.admin_port
                    )
                    if worker.reload_pending:
                        worker.reload_pending = False
                        self._signal(worker, signal.SIGHUP)
            await asyncio.sleep(ANNOUNCE_POLL_INTERVAL)

    def _signal(self, worker: WorkerSlot, signum: signal.Signals) -> None:
        if worker.process is not None and worker.alive:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)

    async def _render_metrics(self) -> bytes:
        return (await self.metrics_text()).encode()


def receiver_endpoints(config: Config) -> list[str]:
    """The host:port of every receiver the config enables."""
    otlp, zipkin = config.receivers.otlp, config.receivers.zipkin
    servers = [
        *([] if otlp is None else [otlp.http, otlp.grpc]),
        zipkin,
    ]
    return [server.endpoint for server in servers if server is not None]


def check_ports_free(endpoints: list[str]) -> None:
    """OSError naming the endpoint when a process listens on one already: the workers share their ports
    with each other (SO_REUSEPORT), never with another gateway or program. Checked once, before the first
    worker starts."""
    with contextlib.ExitStack() as probes:  # all held, listening, until every endpoint is checked
        for endpoint in endpoints:
            host, _, port = endpoint.rpartition(":")
            if not int(port):
                continue
            try:
                addresses = socket.getaddrinfo(
                    host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
                for family, kind, protocol, _, address in addresses:
                    probe = probes.enter_context(socket.socket(family, kind, protocol))
                    # As the receivers bind, but without SO_REUSEPORT: a listener already there, or
                    # another receiver of this config on the same port, refuses it.
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(address)
                    probe.listen(1)
            except OSError as error:
                raise OSError(
                    f"receiver endpoint {endpoint} is in use or unavailable: {error.strerror or error}"
                ) from None


def _parse_each(texts: list[str | None]) -> list[list[Metric] | None]:
    """Each text's families; None for a text missing or malformed."""
    parsed: list[list[Metric] | None] = []
    for text in texts:
        try:
            parsed.append(None if text is None else parse_exposition(text))
        except ValueError:
            parsed.append(None)
    return parsed


def run_supervisor(config_path: str, config: Config, command: WorkerCommand | None = None) -> int:
    """`tailgate run` with `workers` > 1: supervise the workers until signalled; the exit status."""
    import uvloop

    supervisor = Supervisor(config_path, config, command)
    try:
        status = uvloop.run(supervisor.run_until_signalled())
    except (OSError, TailgateError) as error:
        print(f"tailgate: cannot start: {error}", file=sys.stderr)
        return EXIT_START_ERROR
    if supervisor.start_failure is not None:
        print(f"tailgate: {supervisor.start_failure}", file=sys.stderr)
    return status
