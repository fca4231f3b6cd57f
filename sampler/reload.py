"""Config reload: the file read again on SIGHUP and, with `reload.watch`, when it changes; which of a reloaded
config a running gateway takes live, and which key paths need a restart."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from policies.base import Policy
from policies.registry import build_policies
from sampler.config import Config, ReloadConfig, load_config
from sampler.errors import ConfigError
from sampler.metrics import Metrics

log = logging.getLogger(__name__)

# Built once at start: listeners, exporter connections and queues, the memory monitor, cache tables, the
# write-ahead log, the worker processes and the cluster membership.
RESTART_ONLY = (
    "receivers",
    "exporters",
    "admin",
    "capture",
    "memory",
    "durability",
    "wal",
    "workers",
    "cluster",
    "tail_sampling.decision_cache",
)

Fingerprint = tuple[int, int, bytes]


def changed_paths(old: Any, new: Any, path: str = "") -> list[str]:
    """Key paths whose values differ in two `model_dump()`s, as deep as both sides are mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [
            changed
            for key in sorted(old.keys() | new.keys(), key=str)
            for changed in changed_paths(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        ]
    return [] if old == new else [path]


def live_config(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """The config to run after a reload: `loaded` with the restart-only sections of `running`; and the
    restart-only key paths in which `loaded` differs (kept as they run until a restart)."""
    restart = [
        path
        for path in changed_paths(running.model_dump(), loaded.model_dump())
        if any(path == section or path.startswith(f"{section}.") for section in RESTART_ONLY)
    ]
    sampling = loaded.tail_sampling.model_copy(
        update={"decision_cache": running.tail_sampling.decision_cache}
    )
    kept = {section: getattr(running, section) for section in RESTART_ONLY if "." not in section}
    config = loaded.model_copy(update={**kept, "tail_sampling": sampling})
    return config, restart


def rebuild_policies(
    running_specs: Sequence[dict[str, Any]], running: Sequence[Policy], specs: list[dict[str, Any]]
) -> list[Policy]:
    """The policies `specs` configure. A policy whose spec is unchanged is the running object, so that its
    state (rate limiting buckets, dynamic sample rates) carries over; the others start fresh."""
    policies = build_policies(specs, "tail_sampling.policies")
    unchanged = list(zip(running_specs, running, strict=True))
    for index, spec in enumerate(specs):
        match = next((i for i, (old_spec, _) in enumerate(unchanged) if old_spec == spec), None)
        if match is not None:
            policies[index] = unchanged.pop(match)[1]
    return policies


class ConfigReloader:
    """Reads the config file again when asked (SIGHUP) or, with `reload.watch`, when its content changes,
    and hands each valid config to `apply`; an invalid one is logged and the running config stays."""

    def __init__(
        self, path: str, settings: ReloadConfig, apply: Callable[[Config], None], metrics: Metrics
    ) -> None:
        self.path = path
        self.settings = settings
        self._apply = apply
        self._applied = metrics.config_reloads.labels("applied")
        self._failed = metrics.config_reloads.labels("failed")
        self._success = metrics.config_last_reload_success
        self._timestamp = metrics.config_last_reload_timestamp
        # The config the gateway starts with was loaded just before.
        self._success.set(1)
        self._timestamp.set(time.time())
        self._fingerprint = _fingerprint(path)
        self._started = False
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> bool:
        """Read and apply the config file now; whether it was applied."""
        self._fingerprint = _fingerprint(self.path)
        try:
            config = load_config(self.path)
        except ConfigError as error:
            log.error(
                "config reload: invalid config %s, still running the previous one:\n%s", self.path, error
            )
            return self._count(applied=False)
        except Exception:  # a bug in validating: the watch goes on, the running config too
            log.exception("config reload: reading %s failed, still running the previous one", self.path)
            return self._count(applied=False)
        try:
            self._apply(config)
        except Exception:
            log.exception("config reload: applying %s failed", self.path)
            return self._count(applied=False)
        self.configure(config.reload)
        log.info("config reload: applied %s", self.path)
        return self._count(applied=True)

    def _count(self, applied: bool) -> bool:
        (self._applied if applied else self._failed).inc()
        self._success.set(1 if applied else 0)
        if applied:
            self._timestamp.set(time.time())
        return applied

    def configure(self, settings: ReloadConfig) -> None:
        """Take the `reload:` block of a reloaded config: start watching, or stop at the next poll."""
        self.settings = settings
        if self._started and settings.watch and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(), name="tailgate-reload-watch")

    def start(self) -> None:
        self._started = True
        self.configure(self.settings)

    async def stop(self) -> None:
        self._started = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        """Poll the file every `reload.interval` while `reload.watch` holds; reload when it changed."""
        try:
            while self.settings.watch:
                await asyncio.sleep(self.settings.interval)
                current = _fingerprint(self.path)
                # Unreadable: an editor between unlink and rename, say; the next poll sees the new file.
                if self.settings.watch and current is not None and current != self._fingerprint:
                    self.reload()
        finally:
            self._task = None


def _fingerprint(path: str) -> Fingerprint | None:
    """Modification time, size and content hash: an edit within the file system's mtime granularity that
    keeps the size still changes the hash."""
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            digest = hashlib.sha256(file.read()).digest()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, digest
