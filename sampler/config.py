"""The one typed configuration model: YAML in, `${VAR}` substituted, validated, errors naming key paths."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from policies.registry import build_policies
from sampler.errors import ConfigError, validation_message

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_UNIT_SECONDS = {
    None: 1.0,
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def _parse_duration(value: Any) -> Any:
    """Durations as the OTel Collector writes them ("30s", "500ms", "1m") or plain seconds."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"invalid duration {value!r} (use e.g. 30s, 500ms, 2m)")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0)]
PositiveSeconds = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]


def _not_bool(value: Any) -> Any:
    # pydantic's lax mode reads `true` as 1; for a count that is a typo, not a value.
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    return value


Count = Annotated[int, BeforeValidator(_not_bool), Field(gt=0)]
CacheSize = Annotated[int, BeforeValidator(_not_bool), Field(ge=0)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _check_endpoint(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"endpoint {value!r} must be host:port")
    return value


Endpoint = Annotated[str, BeforeValidator(lambda v: _check_endpoint(str(v)))]


MaxRequestBytes = Annotated[Count, Field(le=1 << 30)]


class ServerTLSConfig(Model):
    """TLS on a receiver: its certificate and key; with `client_ca_file`, clients must present one (mTLS)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None


class AuthConfig(Model):
    """Ingest authentication: a request must carry one of `bearer_tokens` (Authorization: Bearer ...) or,
    with `header`, that header with one of `header_values`. Values usually come from `${ENV}`."""

    bearer_tokens: list[SecretStr] = Field(default_factory=list)
    header: str | None = None
    header_values: list[SecretStr] = Field(default_factory=list)

    @model_validator(mode="after")
    def _credentials_given(self) -> AuthConfig:
        if not self.bearer_tokens and self.header is None:
            raise ValueError("give bearer_tokens, or header with header_values")
        if (self.header is None) != (not self.header_values):
            raise ValueError("header and header_values go together")
        if self.header is not None and not re.fullmatch(r"[0-9A-Za-z_.-]+", self.header):
            raise ValueError(f"header {self.header!r} is not a valid header name")
        if any(not value.get_secret_value().strip() for value in [*self.bearer_tokens, *self.header_values]):
            # An unset `${VAR:-}` would otherwise accept requests with an empty credential.
            raise ValueError("a token or header value is empty")
        return self


class ReceiverSecurity(Model):
    """What every receiver shares: TLS and authentication, both off by default."""

    tls: ServerTLSConfig | None = None
    auth: AuthConfig | None = None


def _enabled(value: Any) -> Any:
    # As in the OTel Collector, a receiver is on when its key is present, even with no settings.
    return {} if value is None else value


class OTLPHTTPReceiverConfig(ReceiverSecurity):
    endpoint: Endpoint = "127.0.0.1:4318"
    # The body after decompression; larger requests get 413.
    max_request_bytes: MaxRequestBytes = 8 * 1024 * 1024


class OTLPGRPCReceiverConfig(ReceiverSecurity):
    endpoint: Endpoint = "127.0.0.1:4317"
    # The message after decompression; larger ones get RESOURCE_EXHAUSTED.
    max_request_bytes: MaxRequestBytes = 8 * 1024 * 1024


class ZipkinReceiverConfig(ReceiverSecurity):
    endpoint: Endpoint = "127.0.0.1:9411"
    max_request_bytes: MaxRequestBytes = 8 * 1024 * 1024


class OTLPReceiversConfig(Model):
    http: Annotated[OTLPHTTPReceiverConfig | None, BeforeValidator(_enabled)] = None
    grpc: Annotated[OTLPGRPCReceiverConfig | None, BeforeValidator(_enabled)] = None


class ReceiversConfig(Model):
    """Each receiver runs when its block is present (`receivers: {otlp: {http:, grpc:}, zipkin:}`)."""

    otlp: OTLPReceiversConfig | None = None
    zipkin: Annotated[ZipkinReceiverConfig | None, BeforeValidator(_enabled)] = None

    @model_validator(mode="after")
    def _at_least_one(self) -> ReceiversConfig:
        otlp = self.otlp
        if (otlp is None or (otlp.http is None and otlp.grpc is None)) and self.zipkin is None:
            raise ValueError("no receiver configured (add otlp.http, otlp.grpc or zipkin)")
        return self


_DEFAULT_RECEIVERS = ReceiversConfig(otlp=OTLPReceiversConfig(http=OTLPHTTPReceiverConfig()))


class DecisionCacheConfig(Model):
    sampled_cache_size: CacheSize = 100_000
    non_sampled_cache_size: CacheSize = 100_000


class AttributeLimitsConfig(Model):
    """Limits on the attributes of forwarded spans, as the OTel SDK's OTEL_ATTRIBUTE_COUNT_LIMIT and
    OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT; 0 = no limit."""

    # Per span, and per event and link of it: the first this many attributes are kept.
    max_attributes_per_span: CacheSize = 0
    # Characters of a string value, bytes of a bytes value (also inside arrays and key-value lists).
    max_attribute_value_length: CacheSize = 0


class TailSamplingConfig(Model):
    """The OTel Collector's `tail_sampling` block, plus tailgate's buffer limits."""

    decision_wait: Seconds = 30.0
    decision_wait_after_root_received: Seconds = 2.0
    num_traces: Count = 50_000
    max_spans_per_trace: Count = 10_000
    max_buffered_spans: Count = 2_000_000
    decision_tick: PositiveSeconds = 0.05
    record_policy: bool = True
    decision_cache: DecisionCacheConfig = DecisionCacheConfig()
    # As the Collector: stop evaluating at the first policy that samples (drop policies still go first).
    sample_on_first_match: bool = False
    # As the Collector: at shutdown, drop buffered traces instead of deciding them.
    drop_pending_traces_on_shutdown: bool = False
    # As the Collector: a trace whose spans exceed this many serialized bytes is dropped at once, and its
    # later spans with it; 0 = no limit.
    maximum_trace_size_bytes: CacheSize = 0
    # Write each kept span's keep probability: the tracestate `ot=th:` threshold and tailgate.sample_rate.
    adjusted_counts: bool = True
    attribute_limits: AttributeLimitsConfig = AttributeLimitsConfig()
    # Collector options tailgate accepts without acting on them; `unsupported_options` says why.
    expected_new_traces_per_sec: CacheSize = 0
    block_on_overflow: bool = False
    # Validated by the policy registry, which knows each type's parameters.
    policies: list[dict[str, Any]] = Field(default_factory=list)

    def unsupported_options(self) -> list[str]:
        """Collector options set in this block that tailgate accepts but does not act on, with why."""
        notes: list[str] = []
        if "expected_new_traces_per_sec" in self.model_fields_set:
            notes.append(
                "tail_sampling.expected_new_traces_per_sec: ignored (a sizing hint; tailgate's tables grow "
                "as needed)"
            )
        if self.block_on_overflow:
            notes.append(
                "tail_sampling.block_on_overflow: ignored (tailgate never evicts a trace undecided: over "
                "num_traces the oldest traces are decided early)"
            )
        return notes


class RetryConfig(Model):
    """As the OTel Collector's `retry_on_failure`."""

    enabled: bool = True
    initial_interval: Seconds = 1.0
    max_interval: Seconds = 30.0
    max_elapsed_time: Seconds = 300.0
    multiplier: float = Field(default=1.5, ge=1.0)


class BatchConfig(Model):
    send_batch_size: Count = 8192
    timeout: Seconds = 0.2
    # Spans waiting in the exporter (batched and in flight) before new ones are dropped and counted.
    queue_size: Count = 500_000
    num_consumers: Count = 4


class ClientTLSConfig(Model):
    """TLS towards a downstream: trust `ca_file` (else the system store), check `server_name` (else the
    endpoint's host); `insecure_skip_verify` turns checking off. `cert_file`/`key_file` for mTLS."""

    ca_file: str | None = None
    server_name: str | None = None
    insecure_skip_verify: bool = False
    cert_file: str | None = None
    key_file: str | None = None

    @model_validator(mode="after")
    def _key_pair(self) -> ClientTLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class SendingQueueConfig(Model):
    """The exporter's queue of kept batches (as the OTel Collector's `sending_queue`): in memory, or in
    segment files under `directory` that survive a restart and hold what the downstream cannot take yet."""

    storage: Literal["memory", "disk"] = "memory"
    # Required with storage: disk; each exporter keeps its segments in a subdirectory named after it.
    directory: Annotated[str | None, Field(validate_default=True)] = None
    max_bytes: Count = 1 << 30  # on disk; beyond it, `when_full`
    fsync: Literal["always", "batch", "never"] = "batch"
    when_full: Literal["backpressure", "drop"] = "backpressure"

    @field_validator("directory")
    @classmethod
    def _directory_for_disk(cls, value: str | None, info: ValidationInfo) -> str | None:
        if not value and info.data.get("storage") == "disk":
            raise ValueError("required when storage is disk")
        return value


class SendingExporterConfig(Model):
    """Settings every exporter that sends over the network shares."""

    tls: ClientTLSConfig | None = None
    sending_queue: SendingQueueConfig = SendingQueueConfig()
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Literal["gzip", "none"] = "gzip"
    timeout: PositiveSeconds = 10.0
    retry_on_failure: RetryConfig = RetryConfig()
    batch: BatchConfig = BatchConfig()


def _check_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


HTTPURL = Annotated[str, AfterValidator(_check_url)]


def _check_https(endpoint: str, tls: ClientTLSConfig | None) -> None:
    # aiohttp would send to an http:// URL in plaintext, whatever `tls` says.
    if tls is not None and not endpoint.startswith("https://"):
        raise ValueError("tls is set: the endpoint must be an https:// URL")


class OTLPHTTPExporterConfig(SendingExporterConfig):
    type: Literal["otlp_http"] = "otlp_http"
    endpoint: HTTPURL

    @model_validator(mode="after")
    def _tls_over_https(self) -> OTLPHTTPExporterConfig:
        _check_https(self.endpoint, self.tls)
        return self


def _grpc_target(value: Any) -> Any:
    # Accepted as the OTel SDKs write it too: http://host:port (plaintext).
    if isinstance(value, str) and value.startswith("http://"):
        value = value.removeprefix("http://").rstrip("/")
    return value


class OTLPGRPCExporterConfig(SendingExporterConfig):
    type: Literal["otlp_grpc"] = "otlp_grpc"
    # host:port of an OTLP/gRPC server: plaintext, or TLS with `tls:`.
    endpoint: Annotated[Endpoint, BeforeValidator(_grpc_target)]

    @field_validator("tls")
    @classmethod
    def _verified(cls, value: ClientTLSConfig | None) -> ClientTLSConfig | None:
        if value is not None and value.insecure_skip_verify:
            raise ValueError(
                "insecure_skip_verify is not available for otlp_grpc: grpc always checks the server's "
                "certificate; give its CA in ca_file (and server_name if the certificate names another host)"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _metadata_keys(cls, value: dict[str, str]) -> dict[str, str]:
        # gRPC metadata keys are lower case; a `-bin` suffix would need binary values.
        lowered = {key.lower(): item for key, item in value.items()}
        for key in lowered:
            if key.endswith("-bin") or not re.fullmatch(r"[0-9a-z_.-]+", key):
                raise ValueError(f"invalid gRPC metadata key {key!r}")
        return lowered


class ZipkinExporterConfig(SendingExporterConfig):
    type: Literal["zipkin"] = "zipkin"
    # The Zipkin v2 API, e.g. http://zipkin:9411/api/v2/spans.
    endpoint: HTTPURL
    # localEndpoint.serviceName for spans whose resource has no service.name.
    default_service_name: str = "unknown_service"

    @model_validator(mode="after")
    def _tls_over_https(self) -> ZipkinExporterConfig:
        _check_https(self.endpoint, self.tls)
        return self


class FileExporterConfig(Model):
    type: Literal["file"] = "file"
    path: str
    batch: BatchConfig = BatchConfig(send_batch_size=1024, timeout=0.5)


ExporterConfig = Annotated[
    OTLPHTTPExporterConfig | OTLPGRPCExporterConfig | ZipkinExporterConfig | FileExporterConfig,
    Field(discriminator="type"),
]
EXPORTER_TYPES: dict[str, type[Model]] = {
    "otlp_http": OTLPHTTPExporterConfig,
    "otlp_grpc": OTLPGRPCExporterConfig,
    "zipkin": ZipkinExporterConfig,
    "file": FileExporterConfig,
}


class StressReliefConfig(Model):
    """Refinery's stress relief: above `activation_level` of `max_memory` new traces are decided at once by
    trace-id hash (`sample_percentage` kept); below `deactivation_level` normal sampling resumes."""

    activation_level: Annotated[float, Field(gt=0, le=100)] = 90.0
    deactivation_level: Annotated[float, Field(gt=0, le=100)] = 75.0
    sample_percentage: Annotated[float, Field(ge=0, le=100)] = 10.0

    @model_validator(mode="after")
    def _hysteresis(self) -> StressReliefConfig:
        if self.deactivation_level > self.activation_level:
            raise ValueError("deactivation_level must not be above activation_level")
        return self


class MemoryConfig(Model):
    """Bounded memory: an estimate of the buffer's bytes (checked against the process RSS) stays under
    `max_memory`; when it cannot (the export queue full too), receivers answer 429 / RESOURCE_EXHAUSTED."""

    max_memory: ByteSize | None = None
    stress_relief: StressReliefConfig = StressReliefConfig()
    retry_after: PositiveSeconds = 1.0

    @field_validator("max_memory")
    @classmethod
    def _positive(cls, value: ByteSize | None) -> ByteSize | None:
        if value is not None and value <= 0:
            raise ValueError("must be more than 0 bytes (or leave it out: no limit)")
        return value


class ReloadConfig(Model):
    """Config reload on SIGHUP, and with `watch` when the file changes."""

    watch: bool = False
    interval: PositiveSeconds = 2.0


class WALConfig(Model):
    """The write-ahead log of `durability: wal`: accepted requests are appended here before they are
    acknowledged, and replayed after a crash."""

    directory: str = "tailgate-wal"
    # When a reply waits for the disk: `always` fsyncs before answering (group commit), `batch` at most
    # every 100 ms in the background, `never` leaves it to the OS (still safe against a killed process).
    fsync: Literal["always", "batch", "never"] = "batch"
    # Beyond this on disk, receivers refuse requests (503 / UNAVAILABLE) until exports catch up.
    max_bytes: Count = 1 << 30
    segment_bytes: Count = 64 << 20
    # How often decided and exported traces are checkpointed and their segments deleted.
    checkpoint_interval: PositiveSeconds = 1.0


class RedisMembershipConfig(Model):
    """Cluster membership through a Redis server: heartbeat keys with a TTL, pub/sub for changes."""

    # host:port, or a redis:// / rediss:// / unix:// URL.
    address: str = "127.0.0.1:6379"
    username: str | None = None
    password: SecretStr | None = None
    db: Annotated[int, Field(ge=0)] = 0
    key_prefix: str = "tailgate"
    # How often a member renews its key; it is gone for the others `timeout` after its last renewal.
    heartbeat: PositiveSeconds = 1.0
    timeout: PositiveSeconds = 5.0

    @model_validator(mode="after")
    def _timeout_after_heartbeat(self) -> RedisMembershipConfig:
        if self.timeout <= self.heartbeat:
            raise ValueError("timeout must be longer than heartbeat")
        return self


# The largest request a member sends another (and takes): `forward.max_batch_bytes` at most.
MAX_BATCH_BYTES = 64 << 20


class ForwardConfig(Model):
    """Spans sent on to the member that owns their trace: batched per peer by size and time."""

    # Messages are cut to this size too, so a request is never larger, except for one trace over it.
    max_batch_bytes: Annotated[Count, Field(le=MAX_BATCH_BYTES)] = 4 << 20
    max_delay: PositiveSeconds = 0.02
    # Requests in flight per peer at most, a connection each. One is enough: what is queued while a
    # request is answered goes out as the next, larger, request.
    max_in_flight: Annotated[Count, Field(le=64)] = 1
    # Bytes waiting per peer at most; beyond it a request whose spans cannot be queued is refused (503).
    queue_bytes: Count = 64 << 20
    timeout: PositiveSeconds = 5.0


class ClusterConfig(Model):
    """Membership of a cluster of gateways: each trace id is owned by exactly one member."""

    # Where this member listens for spans forwarded by its peers.
    endpoint: Endpoint = "127.0.0.1:4319"
    # How peers reach this member (its id in the member list); the endpoint when not set.
    advertise: str | None = None
    # Static membership: every member's advertised address, this one's included. Or `redis`.
    peers: list[str] = Field(default_factory=list)
    redis: RedisMembershipConfig | None = None
    forward: ForwardConfig = ForwardConfig()

    @model_validator(mode="after")
    def _one_membership(self) -> ClusterConfig:
        if bool(self.peers) == (self.redis is not None):
            raise ValueError("set exactly one of peers (a static list) and redis")
        return self

    @property
    def member_id(self) -> str:
        return self.advertise or self.endpoint


class AdminConfig(Model):
    endpoint: Endpoint = "127.0.0.1:8888"


class Config(Model):
    # Without a receivers block: OTLP/HTTP on its default endpoint.
    receivers: ReceiversConfig = _DEFAULT_RECEIVERS
    tail_sampling: TailSamplingConfig = TailSamplingConfig()
    # Keyed `type` or `type/name` as in the OTel Collector, e.g. `otlp_http/backend`.
    exporters: dict[str, ExporterConfig] = Field(min_length=1)
    admin: AdminConfig = AdminConfig()
    # Every span the receivers decode, also written as OTLP JSON lines before sampling (for `simulate`).
    capture: FileExporterConfig | None = None
    memory: MemoryConfig = MemoryConfig()
    reload: ReloadConfig = ReloadConfig()
    # `wal`: accepted requests are written ahead to `wal.directory` and survive a crash.
    durability: Literal["none", "wal"] = "none"
    wal: WALConfig = WALConfig()
    # Processes serving the same ports (SO_REUSEPORT), each owning a share of the trace ids.
    workers: Annotated[int, BeforeValidator(_not_bool), Field(ge=1, le=64)] = 1
    cluster: ClusterConfig | None = None
    shutdown_timeout: Seconds = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("workers")
    @classmethod
    def _one_directory_per_process(cls, value: int, info: ValidationInfo) -> int:
        """Workers would share the write-ahead log's and the disk queues' directories, which one process
        locks at a time."""
        if value <= 1:
            return value
        if info.data.get("durability") == "wal":
            raise ValueError("cannot be combined with durability: wal (its directory takes one process)")
        for name, exporter in (info.data.get("exporters") or {}).items():
            queue = getattr(exporter, "sending_queue", None)
            if queue is not None and queue.storage == "disk":
                raise ValueError(
                    f"cannot be combined with the disk sending queue of exporter {name!r} "
                    "(its directory takes one process)"
                )
        return value

    @field_validator("cluster")
    @classmethod
    def _not_with_workers(cls, value: ClusterConfig | None, info: ValidationInfo) -> ClusterConfig | None:
        if value is not None and info.data.get("workers", 1) > 1:
            raise ValueError("cannot be combined with workers above 1 (run one gateway process per member)")
        return value

    @field_validator("exporters", mode="before")
    @classmethod
    def _exporter_types(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        typed: dict[str, Any] = {}
        for key, block in value.items():
            kind = str(key).split("/", 1)[0]
            if kind not in EXPORTER_TYPES:
                raise ValueError(
                    f"exporter {key!r}: unknown type {kind!r} (known: {', '.join(EXPORTER_TYPES)})"
                )
            if block is not None and not isinstance(block, dict):
                raise ValueError(f"exporter {key!r}: must be a mapping of settings")
            typed[key] = {**(block or {}), "type": kind}
        return typed


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(value: Any, path: str) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in string values; `$$` is a literal `$`."""
    if isinstance(value, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise ConfigError(f"{path}: environment variable {name} is not set")

    return _VAR.sub(replace, value)


def _without_exporter_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """Drop the discriminator pydantic adds to an exporter's path (`exporters.file.file.path`)."""
    if len(loc) > 2 and loc[0] == "exporters" and loc[2] in EXPORTER_TYPES:
        return loc[:2] + loc[3:]
    return loc


def parse_config(data: Any, source: str = "<config>") -> Config:
    """Validate an already-loaded YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    data = _substitute(data, "")
    try:
        config = Config.model_validate(data)
    except ValidationError as error:
        raise ConfigError(validation_message(error, clean_loc=_without_exporter_tag)) from None
    build_policies(config.tail_sampling.policies, "tail_sampling.policies")
    return config


def load_config(path: str | Path) -> Config:
    """Read, substitute and validate a YAML config file."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {error}") from None
    return parse_config(data, str(path))
