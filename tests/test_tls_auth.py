"""TLS on receivers and exporters, ingest authentication, and secrets kept out of logs and /metrics.

Real TLS peers throughout: the OTel SDK's exporters, aiohttp and grpc clients, and tailgate itself as the
TLS downstream of another tailgate; certificates come from a test CA made with trustme.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import requests
import trustme
import yaml
from cryptography.hazmat.primitives import serialization
from google.rpc.status_pb2 import Status
from multidict import CIMultiDictProxy
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GRPCSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HTTPSpanExporter

from sampler.app import Gateway
from sampler.config import parse_config
from sampler.errors import ConfigError
from tests.conftest import (
    ROOT,
    TAILGATE,
    Downstream,
    GatewayFactory,
    free_port,
    gateway_config,
    metric,
    wait_for,
)
from tests.exporters.helpers import Downstream as ScriptedDownstream
from tests.exporters.helpers import Reply
from tests.grpc_downstream import EXPORT
from tests.otlp_data import JSON, PROTOBUF, make_request, send, send_sdk_traces

# Distinct per run, so that finding one in a log or in /metrics cannot be a coincidence.
TOKEN = f"token-{secrets.token_hex(12)}"
WRONG_TOKEN = f"wrong-{secrets.token_hex(12)}"
API_KEY = f"key-{secrets.token_hex(12)}"
WRONG_API_KEY = f"wrongkey-{secrets.token_hex(12)}"
EXPORTER_KEY = f"exporter-{secrets.token_hex(12)}"
SECRETS = (TOKEN, WRONG_TOKEN, API_KEY, WRONG_API_KEY, EXPORTER_KEY)

REQUESTS = "tailgate_receiver_requests_total"
REFUSED = "tailgate_receiver_rejected_requests_total"
SENT = "tailgate_exporter_sent_spans_total"
FAILED = "tailgate_exporter_failed_spans_total"
RETRIES = "tailgate_exporter_retries_total"
# Where each protocol's receiver sits in the config, and its path.
RECEIVER_KEYS = {"otlp_http": ("otlp", "http"), "otlp_grpc": ("otlp", "grpc"), "zipkin": ("zipkin",)}
PATHS = {"otlp_http": "/v1/traces", "zipkin": "/api/v2/spans"}
DOWNSTREAM_NAME = "tailgate-b.test"  # the only name in the certificate of the TLS downstream tailgate


@dataclass
class PKI:
    """A test CA and the PEM files issued by it, written under `directory`."""

    ca: trustme.CA
    directory: Path

    @property
    def ca_file(self) -> str:
        path = self.directory / "ca.pem"
        if not path.exists():
            self.ca.cert_pem.write_to_path(str(path))
        return str(path)

    def issue(self, name: str, *names: str) -> tuple[str, str]:
        """A certificate for `name` (and `names`) and its key, as (cert_file, key_file)."""
        cert = self.ca.issue_cert(name, *names)
        cert_file, key_file = self.directory / f"{name}.crt", self.directory / f"{name}.key"
        cert.cert_chain_pems[0].write_to_path(str(cert_file))
        cert.private_key_pem.write_to_path(str(key_file))
        return str(cert_file), str(key_file)

    def server_tls(self, name: str = "127.0.0.1", **extra: str) -> dict[str, str]:
        cert_file, key_file = self.issue(name)
        return {"cert_file": cert_file, "key_file": key_file, **extra}

    def client_context(self, client_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if client_cert:
            context.load_cert_chain(*self.issue("client"))
        return context


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(trustme.CA(), tmp_path)


@pytest.fixture
def sdk_trusts_certificate_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's OTLP/HTTP exporter sets `certificate_file` on a requests Session, and requests lets these
    variables override a Session's `verify`."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def secured_config(downstream: Downstream, protocol: str, **security: Any) -> dict[str, Any]:
    """`gateway_config` with one receiver of `protocol` carrying `security` (tls, auth), and an exporter
    header holding a secret."""
    config = gateway_config(downstream)
    receivers: dict[str, Any] = {}
    *parents, leaf = RECEIVER_KEYS[protocol]
    block = receivers
    for key in parents:
        block = block.setdefault(key, {})
    block[leaf] = {"endpoint": f"127.0.0.1:{free_port()}", **security}
    config["receivers"] = receivers
    config["exporters"]["otlp_http"]["headers"] = {"x-api-key": EXPORTER_KEY}
    return config


def port_of(gateway: Gateway) -> int:
    port = gateway.receivers[0].port
    assert port is not None
    return port


def https_url(gateway: Gateway) -> str:
    return f"https://127.0.0.1:{port_of(gateway)}{PATHS[gateway.receivers[0].protocol]}"


async def metrics_text(gateway: Gateway) -> str:
    """What /metrics on the admin endpoint shows."""
    url = f"http://{gateway.config.admin.endpoint}/metrics"
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        return await reply.text()


def captured_logs(caplog: pytest.LogCaptureFixture) -> str:
    """Every record of the test so far, setup and call included, as formatted for a log."""
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return "\n".join(formatter.format(record) for record in records)


def assert_no_secrets(text: str) -> None:
    found = [index for index, secret in enumerate(SECRETS) if secret in text]
    assert not found, f"secrets {found} (indexes in SECRETS) exposed"


@pytest.fixture
async def start(
    start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[GatewayFactory]:
    """`start_gateway`, and when the test is over: no secret in any log record of the test (DEBUG and up)
    nor in any started gateway's /metrics."""
    caplog.set_level(logging.DEBUG)
    started: list[Gateway] = []

    async def start_one(config: dict[str, Any]) -> Gateway:
        gateway = await start_gateway(config)
        started.append(gateway)
        return gateway

    yield start_one
    exposed = [await metrics_text(gateway) for gateway in started if gateway.ready]
    for gateway in started:
        if gateway.ready:
            await gateway.stop()  # its shutdown logs are scanned too
    assert_no_secrets("\n".join([captured_logs(caplog), *exposed]))


async def post(
    url: str, body: bytes, headers: dict[str, str], context: ssl.SSLContext | None = None
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    """POST over TLS trusting `context`; the reply's status, headers and body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers, ssl=context or True) as reply,
    ):
        return reply.status, reply.headers, await reply.read()


def zipkin_trace() -> tuple[bytes, bytes]:
    """A Zipkin v2 JSON body of one root span, and its trace id as OTLP bytes."""
    trace_id = secrets.token_bytes(16)
    span = {
        "traceId": trace_id.hex(),
        "id": secrets.token_hex(8),
        "name": "GET /",
        "timestamp": time.time_ns() // 1000,
        "duration": 1000,
        "localEndpoint": {"serviceName": "zipkin-client"},
    }
    return json.dumps([span]).encode(), trace_id


def trace_ids(request: Any) -> set[bytes]:
    return {span.trace_id for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans}


# --- receivers over TLS -----------------------------------------------------------------------------------


@pytest.mark.usefixtures("sdk_trusts_certificate_file")
async def test_sdk_otlp_http_exporter_over_tls(
    start: GatewayFactory, downstream: Downstream, pki: PKI
) -> None:
    gateway = await start(secured_config(downstream, "otlp_http", tls=pki.server_tls()))
    exporter = functools.partial(HTTPSpanExporter, certificate_file=pki.ca_file)
    traces = await asyncio.to_thread(send_sdk_traces, https_url(gateway), ["ok"] * 20, exporter)
    await wait_for(lambda: set(downstream.spans_by_trace()) == set(traces))
    assert all(len(spans) == 4 for spans in downstream.spans_by_trace().values())
    # Only TLS is served: a client that does not trust the CA fails the handshake, plaintext gets nowhere.
    body = make_request(traces=1, spans_per_trace=1).SerializeToString()
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post(https_url(gateway), body, PROTOBUF)
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(https_url(gateway).replace("https:", "http:"), body, PROTOBUF)
    print(f"\nOTLP/HTTP over TLS: {len(traces)} SDK traces, {len(downstream.spans())} spans downstream")


async def test_sdk_otlp_grpc_exporter_over_tls(
    start: GatewayFactory, downstream: Downstream, pki: PKI
) -> None:
    gateway = await start(secured_config(downstream, "otlp_grpc", tls=pki.server_tls()))
    credentials = grpc.ssl_channel_credentials(pki.ca.cert_pem.bytes())
    exporter = functools.partial(GRPCSpanExporter, credentials=credentials)
    url = f"https://127.0.0.1:{port_of(gateway)}"
    traces = await asyncio.to_thread(send_sdk_traces, url, ["ok"] * 20, exporter)
    await wait_for(lambda: set(downstream.spans_by_trace()) == set(traces))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of(gateway)}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            await channel.unary_unary(EXPORT)(b"", timeout=5)
    assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE
    print(f"\nOTLP/gRPC over TLS: {len(traces)} SDK traces, {len(downstream.spans())} spans downstream")


async def test_zipkin_over_tls(start: GatewayFactory, downstream: Downstream, pki: PKI) -> None:
    config = secured_config(downstream, "zipkin", tls=pki.server_tls())
    config["tail_sampling"]["decision_wait_after_root_received"] = "0.05s"
    gateway = await start(config)
    body, trace_id = zipkin_trace()
    status, _, _ = await post(https_url(gateway), body, JSON, pki.client_context())
    assert status == 202
    await wait_for(lambda: trace_id in downstream.spans_by_trace())


@pytest.mark.usefixtures("sdk_trusts_certificate_file")
async def test_mtls_otlp_http_needs_a_client_certificate_from_the_ca(
    start: GatewayFactory, downstream: Downstream, pki: PKI, tmp_path: Path
) -> None:
    config = secured_config(downstream, "otlp_http", tls=pki.server_tls(client_ca_file=pki.ca_file))
    gateway = await start(config)
    body = make_request(traces=1, spans_per_trace=1).SerializeToString()
    with pytest.raises(aiohttp.ClientConnectionError) as without_cert:
        await post(https_url(gateway), body, PROTOBUF, pki.client_context())
    stranger = PKI(trustme.CA(), tmp_path / "other")
    stranger.directory.mkdir()
    foreign = pki.client_context()
    foreign.load_cert_chain(*stranger.issue("client"))
    with pytest.raises(aiohttp.ClientConnectionError) as foreign_cert:
        await post(https_url(gateway), body, PROTOBUF, foreign)
    assert metric(gateway, REQUESTS, protocol="otlp_http") == 0, "refused in the handshake"
    cert_file, key_file = pki.issue("client")
    exporter = functools.partial(
        HTTPSpanExporter,
        certificate_file=pki.ca_file,
        client_certificate_file=cert_file,
        client_key_file=key_file,
    )
    traces = await asyncio.to_thread(send_sdk_traces, https_url(gateway), ["ok"] * 5, exporter)
    await wait_for(lambda: set(downstream.spans_by_trace()) == set(traces))
    print(f"\nmTLS OTLP/HTTP: no cert -> {without_cert.value!r}; other CA -> {foreign_cert.value!r}")


async def test_mtls_otlp_grpc_needs_a_client_certificate_from_the_ca(
    start: GatewayFactory, downstream: Downstream, pki: PKI
) -> None:
    config = secured_config(downstream, "otlp_grpc", tls=pki.server_tls(client_ca_file=pki.ca_file))
    gateway = await start(config)
    target = f"127.0.0.1:{port_of(gateway)}"
    ca = pki.ca.cert_pem.bytes()
    async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(ca)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as without_cert:
            await channel.unary_unary(EXPORT)(b"", timeout=5)
    assert without_cert.value.code() is grpc.StatusCode.UNAVAILABLE
    assert metric(gateway, REQUESTS, protocol="otlp_grpc") == 0
    client = pki.ca.issue_cert("client")
    credentials = grpc.ssl_channel_credentials(
        ca, client.private_key_pem.bytes(), client.cert_chain_pems[0].bytes()
    )
    exporter = functools.partial(GRPCSpanExporter, credentials=credentials)
    traces = await asyncio.to_thread(send_sdk_traces, f"https://{target}", ["ok"] * 5, exporter)
    await wait_for(lambda: set(downstream.spans_by_trace()) == set(traces))
    print(f"\nmTLS OTLP/gRPC: no cert -> {without_cert.value.code().name}: {without_cert.value.details()}")


# --- ingest authentication --------------------------------------------------------------------------------


async def test_bearer_token_on_otlp_http(
    start: GatewayFactory, downstream: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TAILGATE_TEST_TOKEN", TOKEN)
    auth = {"bearer_tokens": ["${TAILGATE_TEST_TOKEN}", "another-token"]}
    config = secured_config(downstream, "otlp_http", auth=auth, max_request_bytes=4096)
    gateway = await start(config)
    url = f"http://127.0.0.1:{port_of(gateway)}/v1/traces"
    request = make_request(traces=1, spans_per_trace=2)
    body = request.SerializeToString()

    status, headers, reply = await post(url, body, PROTOBUF)
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    missing = Status.FromString(reply)
    assert missing.code == 16  # UNAUTHENTICATED
    assert missing.message == "unauthenticated: no credentials; send Authorization: Bearer <token>"

    wrong = {**JSON, "Authorization": f"Bearer {WRONG_TOKEN}"}
    status, headers, reply = await post(url, b"{}", wrong)
    assert (status, headers["WWW-Authenticate"]) == (401, "Bearer")
    assert json.loads(reply) == {
        "code": 16,
        "message": "unauthenticated: invalid credentials; send Authorization: Bearer <token>",
    }
    # The credentials are checked before the body is read: an oversized body is not what refuses it.
    oversized = b"\x00" * 8192
    assert (await post(url, oversized, {**PROTOBUF, "Authorization": f"Bearer {WRONG_TOKEN}"}))[0] == 401
    assert (await post(url, oversized, {**PROTOBUF, "Authorization": f"Bearer {TOKEN}"}))[0] == 413
    assert metric(gateway, REFUSED, protocol="otlp_http", reason="unauthenticated") == 3

    status, _, _ = await post(url, body, {**PROTOBUF, "Authorization": f"bearer {TOKEN}"})  # scheme: any case
    assert status == 200
    await wait_for(lambda: trace_ids(request) <= set(downstream.spans_by_trace()))
    exporter = functools.partial(HTTPSpanExporter, headers={"Authorization": f"Bearer {TOKEN}"})
    traces = await asyncio.to_thread(send_sdk_traces, url, ["ok"] * 5, exporter)
    await wait_for(lambda: set(traces) <= set(downstream.spans_by_trace()))
    assert metric(gateway, REFUSED, protocol="otlp_http", reason="unauthenticated") == 3
    print(f"\nbearer OTLP/HTTP: 401 {missing.message!r}; refused 3, accepted 1 + {len(traces)} SDK traces")


async def test_bearer_token_on_otlp_grpc_with_the_sdk(start: GatewayFactory, downstream: Downstream) -> None:
    config = secured_config(downstream, "otlp_grpc", auth={"bearer_tokens": [TOKEN]}, max_request_bytes=4096)
    gateway = await start(config)
    target = f"127.0.0.1:{port_of(gateway)}"
    url = f"http://{target}"

    def sdk(token: str, plan: list[str]) -> dict[bytes, tuple[str, int]]:
        exporter = functools.partial(GRPCSpanExporter, headers={"authorization": f"Bearer {token}"})
        return send_sdk_traces(url, plan, exporter)

    refused = await asyncio.to_thread(sdk, WRONG_TOKEN, ["ok"] * 3)
    # Two providers (services), so two calls at least.
    await wait_for(lambda: metric(gateway, REFUSED, protocol="otlp_grpc", reason="unauthenticated") >= 2)
    async with grpc.aio.insecure_channel(target) as channel:
        export = channel.unary_unary(EXPORT)
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await export(b"", timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as oversized:
            await export(b"\x00" * 8192, timeout=5, metadata=(("authorization", f"Bearer {WRONG_TOKEN}"),))
    assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.details() == "unauthenticated: no credentials; send Authorization: Bearer <token>"
    assert oversized.value.code() is grpc.StatusCode.UNAUTHENTICATED, "checked before the message is read"
    refusals = metric(gateway, REFUSED, protocol="otlp_grpc", reason="unauthenticated")

    accepted = await asyncio.to_thread(sdk, TOKEN, ["ok"] * 5)
    await wait_for(lambda: set(downstream.spans_by_trace()) == set(accepted))
    assert not set(refused) & set(downstream.spans_by_trace())
    assert metric(gateway, REFUSED, protocol="otlp_grpc", reason="unauthenticated") == refusals
    print(
        f"\nbearer OTLP/gRPC: SDK with a wrong token refused ({refusals:.0f} calls counted), right token: "
        f"{len(accepted)} traces arrived; details {missing.value.details()!r}"
    )


@pytest.mark.parametrize("protocol", ["zipkin", "otlp_grpc"])
async def test_header_auth(start: GatewayFactory, downstream: Downstream, protocol: str) -> None:
    auth = {"header": "X-API-Key", "header_values": [API_KEY]}
    config = secured_config(downstream, protocol, auth=auth)
    config["tail_sampling"]["decision_wait_after_root_received"] = "0.05s"
    gateway = await start(config)
    port = port_of(gateway)
    wanted = "send the X-API-Key header"
    if protocol == "zipkin":
        url = f"http://127.0.0.1:{port}/api/v2/spans"
        body, trace_id = zipkin_trace()
        status, headers, reply = await post(url, body, JSON)
        assert (status, reply.decode()) == (401, f"unauthenticated: no credentials; {wanted}")
        assert "WWW-Authenticate" not in headers
        status, _, reply = await post(url, body, {**JSON, "x-api-key": WRONG_API_KEY})
        assert (status, reply.decode()) == (401, f"unauthenticated: invalid credentials; {wanted}")
        assert (await post(url, body, {**JSON, "X-Api-Key": API_KEY}))[0] == 202
        expected = {trace_id}
    else:
        request = make_request(traces=1, spans_per_trace=2)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            export = channel.unary_unary(EXPORT)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await export(request.SerializeToString(), timeout=5)
            assert missing.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert missing.value.details() == f"unauthenticated: no credentials; {wanted}"
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await export(request.SerializeToString(), timeout=5, metadata=(("x-api-key", WRONG_API_KEY),))
            assert wrong.value.details() == f"unauthenticated: invalid credentials; {wanted}"
            await export(request.SerializeToString(), timeout=5, metadata=(("x-api-key", API_KEY),))
        expected = trace_ids(request)
    await wait_for(lambda: set(downstream.spans_by_trace()) == expected)
    assert metric(gateway, REFUSED, protocol=protocol, reason="unauthenticated") == 2
    assert metric(gateway, REQUESTS, protocol=protocol) == 3


# --- exporters over TLS, to a tailgate with a TLS receiver ------------------------------------------------


def downstream_tailgate_config(downstream: Downstream, protocol: str, pki: PKI) -> dict[str, Any]:
    """A tailgate receiving `protocol` over mTLS (its certificate names DOWNSTREAM_NAME only) with a bearer
    token, forwarding to `downstream`."""
    tls = pki.server_tls(DOWNSTREAM_NAME, client_ca_file=pki.ca_file)
    config = secured_config(downstream, protocol, tls=tls, auth={"bearer_tokens": [TOKEN]})
    config["tail_sampling"]["decision_wait_after_root_received"] = "0.05s"
    return config


def exporting_config(
    downstream: Downstream, protocol: str, endpoint: str, tls: dict[str, Any] | None
) -> dict[str, Any]:
    """A tailgate receiving plain OTLP/HTTP, exporting with `protocol` to `endpoint` with `tls`."""
    config = gateway_config(downstream)
    exporter = {
        **config["exporters"].pop("otlp_http"),
        "endpoint": endpoint,
        "headers": {"authorization": f"Bearer {TOKEN}", "x-api-key": EXPORTER_KEY},
        "retry_on_failure": {"initial_interval": "0.05s", "max_interval": "0.1s", "max_elapsed_time": "0.5s"},
    }
    if tls is not None:
        exporter["tls"] = tls
    config["exporters"] = {protocol: exporter}
    config["tail_sampling"]["decision_wait_after_root_received"] = "0.05s"
    return config


def endpoint_of(gateway: Gateway) -> str:
    protocol = gateway.receivers[0].protocol
    if protocol == "otlp_grpc":
        return f"127.0.0.1:{port_of(gateway)}"
    return https_url(gateway)


@pytest.mark.parametrize("protocol", ["otlp_http", "otlp_grpc", "zipkin"])
async def test_exporter_delivers_over_mtls_with_ca_file_and_server_name(
    start: GatewayFactory, downstream: Downstream, pki: PKI, protocol: str
) -> None:
    second = await start(downstream_tailgate_config(downstream, protocol, pki))
    cert_file, key_file = pki.issue("tailgate-a")
    tls = {
        "ca_file": pki.ca_file,
        "server_name": DOWNSTREAM_NAME,
        "cert_file": cert_file,
        "key_file": key_file,
    }
    first = await start(exporting_config(downstream, protocol, endpoint_of(second), tls))
    request = make_request(traces=5, spans_per_trace=3)
    await send(f"http://127.0.0.1:{port_of(first)}/v1/traces", request)
    await wait_for(lambda: set(downstream.spans_by_trace()) == trace_ids(request))
    assert metric(first, SENT, exporter=protocol) == 15
    assert metric(first, RETRIES, exporter=protocol) == 0
    assert metric(second, REFUSED, protocol=protocol, reason="unauthenticated") == 0
    print(f"\n{protocol} exporter over mTLS: 15 of 15 spans through the second tailgate")


@pytest.mark.parametrize("protocol", ["otlp_http", "otlp_grpc", "zipkin"])
@pytest.mark.parametrize("problem", ["untrusted", "wrong_name"])
async def test_exporter_refuses_an_unverified_downstream(
    start: GatewayFactory, downstream: Downstream, pki: PKI, protocol: str, problem: str
) -> None:
    second = await start(downstream_tailgate_config(downstream, protocol, pki))
    cert_file, key_file = pki.issue("tailgate-a")
    client = {"cert_file": cert_file, "key_file": key_file}
    if problem == "untrusted":  # the system's trust store, which does not hold the test CA
        tls = {"server_name": DOWNSTREAM_NAME, **client}
    else:  # the right CA, but the certificate does not name 127.0.0.1
        tls = {"ca_file": pki.ca_file, **client}
    first = await start(exporting_config(downstream, protocol, endpoint_of(second), tls))
    loop = asyncio.get_running_loop()
    began = loop.time()
    await send(f"http://127.0.0.1:{port_of(first)}/v1/traces", make_request(traces=2, spans_per_trace=2))
    await wait_for(lambda: metric(first, FAILED, exporter=protocol) == 4)
    elapsed = loop.time() - began
    retries = metric(first, RETRIES, exporter=protocol)
    if protocol == "otlp_grpc":
        # grpc reports a failed handshake as UNAVAILABLE, as it does a downstream that is down: retried.
        assert retries > 0
    else:
        assert retries == 0, "a failed handshake is not retried"
    assert metric(second, REQUESTS, protocol=protocol) == 0
    assert not downstream.requests
    print(f"\n{protocol} exporter, {problem}: 4 spans failed after {elapsed:.2f}s, {retries:.0f} retries")


@pytest.mark.parametrize("protocol", ["otlp_http", "zipkin"])
async def test_insecure_skip_verify_delivers_without_checking_the_certificate(
    start: GatewayFactory, downstream: Downstream, pki: PKI, caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    second = await start(downstream_tailgate_config(downstream, protocol, pki))
    cert_file, key_file = pki.issue("tailgate-a")
    # Neither the CA nor the name would pass a check.
    tls = {"insecure_skip_verify": True, "cert_file": cert_file, "key_file": key_file}
    first = await start(exporting_config(downstream, protocol, endpoint_of(second), tls))
    assert f"exporter {protocol}: tls.insecure_skip_verify is on" in caplog.text
    request = make_request(traces=2, spans_per_trace=2)
    await send(f"http://127.0.0.1:{port_of(first)}/v1/traces", request)
    await wait_for(lambda: set(downstream.spans_by_trace()) == trace_ids(request))


# --- start errors -----------------------------------------------------------------------------------------


OWNERS = {
    "otlp_http": "OTLP/HTTP receiver",
    "otlp_grpc": "OTLP/gRPC receiver",
    "zipkin": "Zipkin receiver",
    "exporter": "exporter otlp_grpc",
}


def bad_file(case: str, pki: PKI, tmp_path: Path) -> str:
    """A file that is `missing`, `not_pem`, a `foreign_key` (of another certificate) or an `encrypted_key`."""
    path = tmp_path / f"{case}.pem"
    if case == "not_pem":
        path.write_text("not a certificate\n")
    elif case == "foreign_key":
        return pki.issue("someone-else")[1]
    elif case == "encrypted_key":
        key = serialization.load_pem_private_key(pki.ca.issue_cert("x").private_key_pem.bytes(), None)
        encryption = serialization.BestAvailableEncryption(b"password")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        path.write_bytes(pem)
    return str(path)


@pytest.mark.parametrize(
    ("where", "key", "case", "problem"),
    [
        (
            "otlp_http",
            "cert_file",
            "missing",
            "tls.cert_file {file}: cannot read it (No such file or directory)",
        ),
        ("otlp_grpc", "cert_file", "not_pem", "tls.cert_file {file}: no PEM certificate in it"),
        (
            "zipkin",
            "key_file",
            "foreign_key",
            "tls.key_file {file}: the key does not belong to the certificate",
        ),
        (
            "otlp_grpc",
            "key_file",
            "encrypted_key",
            "tls.key_file {file}: the key is encrypted; give it unencrypted",
        ),
        ("otlp_http", "client_ca_file", "not_pem", "tls.client_ca_file {file}: no PEM certificate in it"),
        ("exporter", "ca_file", "missing", "tls.ca_file {file}: cannot read it (No such file or directory)"),
    ],
)
async def test_bad_certificate_files_are_start_errors_naming_the_file(
    downstream: Downstream, pki: PKI, tmp_path: Path, where: str, key: str, case: str, problem: str
) -> None:
    file = bad_file(case, pki, tmp_path)
    if where == "exporter":
        config = exporting_config(downstream, "otlp_grpc", "127.0.0.1:1", {key: file})
    else:
        config = secured_config(downstream, where, tls={**pki.server_tls(), key: file})
    gateway = Gateway(parse_config(config))
    try:
        with pytest.raises(ConfigError) as error:
            await gateway.start()
    finally:
        await gateway.stop()
    assert str(error.value).startswith(f"{OWNERS[where]}: tls.")
    assert problem.format(file=file) in str(error.value)
    print(f"\n{where} {case}: {error.value}")


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (
            {"exporters": {"otlp_grpc": {"endpoint": "h:4317", "tls": {"insecure_skip_verify": True}}}},
            "exporters.otlp_grpc.tls: insecure_skip_verify is not available for otlp_grpc",
        ),
        (
            {
                "exporters": {
                    "otlp_http": {"endpoint": "http://h:4318/v1/traces", "tls": {"ca_file": "ca.pem"}}
                }
            },
            "exporters.otlp_http: tls is set: the endpoint must be an https:// URL",
        ),
        (
            {"exporters": {"zipkin": {"endpoint": "https://h/api/v2/spans", "tls": {"cert_file": "c.pem"}}}},
            "exporters.zipkin.tls: cert_file and key_file go together",
        ),
        ({"receivers": {"zipkin": {"auth": {}}}}, "receivers.zipkin.auth: give bearer_tokens, or header"),
        (
            {"receivers": {"otlp": {"grpc": {"auth": {"bearer_tokens": ["${TAILGATE_UNSET_TOKEN:-}"]}}}}},
            "receivers.otlp.grpc.auth: a token or header value is empty",
        ),
        (
            {"receivers": {"otlp": {"http": {"auth": {"header": "X-API-Key"}}}}},
            "receivers.otlp.http.auth: header and header_values go together",
        ),
    ],
)
def test_security_config_errors_name_the_key(section: dict[str, Any], message: str) -> None:
    config = {"exporters": {"file": {"path": "traces.jsonl"}}, **section}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(config)


async def test_cli_exits_1_on_an_unreadable_certificate(
    downstream: Downstream, pki: PKI, tmp_path: Path
) -> None:
    missing = str(tmp_path / "nowhere.pem")
    config = secured_config(downstream, "otlp_http", tls={**pki.server_tls(), "key_file": missing})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = await asyncio.to_thread(
        subprocess.run,
        [*TAILGATE, "run", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert result.returncode == 1
    expected = f"tailgate: cannot start: OTLP/HTTP receiver: tls.key_file {missing}: cannot read it"
    assert expected in result.stderr
    print(f"\nCLI: exit {result.returncode}, {result.stderr.strip().splitlines()[-1]}")


# --- secrets ----------------------------------------------------------------------------------------------


async def test_secrets_stay_out_of_logs_and_metrics_on_every_failure_path(
    start: GatewayFactory, downstream: Downstream, caplog: pytest.LogCaptureFixture
) -> None:
    scripted = ScriptedDownstream()
    await scripted.start()
    try:
        config = secured_config(downstream, "otlp_http", auth={"bearer_tokens": [TOKEN]})
        config["exporters"]["otlp_http"]["endpoint"] = scripted.url
        # A retry (logged at DEBUG), then a refusal that gives up (a WARNING), then a delivery.
        scripted.replies = [Reply(503), Reply(400, body=b"bad batch")]
        gateway = await start(config)
        url = f"http://127.0.0.1:{port_of(gateway)}/v1/traces"
        body = make_request(traces=1, spans_per_trace=1).SerializeToString()
        assert (await post(url, body, {**PROTOBUF, "Authorization": f"Bearer {WRONG_TOKEN}"}))[0] == 401
        assert (await post(url, body, {**PROTOBUF, "Authorization": WRONG_TOKEN}))[0] == 401
        authorized = {**PROTOBUF, "Authorization": f"Bearer {TOKEN}"}
        assert (await post(url, body, authorized))[0] == 200
        await wait_for(lambda: metric(gateway, FAILED, exporter="otlp_http") == 1)
        assert (await post(url, make_request(traces=1, spans_per_trace=1).SerializeToString(), authorized))[
            0
        ] == 200
        await wait_for(lambda: len(scripted.delivered) == 1)
        exposed = await metrics_text(gateway)
    finally:
        await scripted.stop()
    assert {attempt.headers["x-api-key"] for attempt in scripted.attempts} == {EXPORTER_KEY}
    logged = caplog.text
    assert "refused an unauthenticated request from 127.0.0.1" in logged
    assert "HTTP 503" in logged and "retrying" in logged
    assert "HTTP 400 (not retryable): bad batch" in logged
    assert 'reason="unauthenticated"' in exposed
    assert_no_secrets(logged + exposed)
    print(
        f"\nsecrets: {len(caplog.records)} log records, {len(exposed)} bytes of /metrics scanned: none found"
    )


def blocking_post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST with `requests`, as the OTel SDK's OTLP/HTTP exporter does: header values go on the wire as
    Latin-1, so "é" is the byte 0xE9, not UTF-8."""
    reply = requests.post(url, data=body, headers=headers, timeout=5)
    return reply.status_code, reply.content


@pytest.mark.parametrize("protocol", ["otlp_http", "zipkin"])
@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
async def test_credentials_that_are_not_utf8_are_refused_with_401(
    start: GatewayFactory, downstream: Downstream, protocol: str, header: str
) -> None:
    """Header bytes that are not UTF-8 reach the check surrogate-escaped; encoding them failed with a 500
    (and a traceback per request), uncounted."""
    auth = {"bearer_tokens": [TOKEN], "header": "X-API-Key", "header_values": [API_KEY]}
    gateway = await start(secured_config(downstream, protocol, auth=auth))
    url = f"http://127.0.0.1:{port_of(gateway)}{PATHS[protocol]}"
    body = make_request(1, 1).SerializeToString() if protocol == "otlp_http" else b"[]"
    content_type = "application/x-protobuf" if protocol == "otlp_http" else "application/json"
    value = "Bearer t\u00f6k" if header == "authorization" else "k\u00e9y"
    status, reply = await asyncio.to_thread(
        blocking_post, url, body, {"Content-Type": content_type, header: value}
    )
    assert status == 401, reply
    assert metric(gateway, REFUSED, protocol=protocol, reason="unauthenticated") == 1
    if protocol == "otlp_http":
        assert Status.FromString(reply).code == 16


async def test_a_grpc_auth_header_ending_in_bin_is_checked(
    start: GatewayFactory, downstream: Downstream
) -> None:
    """grpc gives the value of a `-bin` metadata key as bytes: the check raised, and every call ended with
    UNKNOWN, right key or wrong."""
    auth = {"header": "x-api-key-bin", "header_values": [API_KEY]}
    gateway = await start(secured_config(downstream, "otlp_grpc", auth=auth))
    body = make_request(1, 1).SerializeToString()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_of(gateway)}") as channel:
        export = channel.unary_unary(EXPORT)
        with pytest.raises(grpc.aio.AioRpcError) as wrong:
            await export(body, timeout=5, metadata=(("x-api-key-bin", WRONG_API_KEY.encode()),))
        assert wrong.value.code() is grpc.StatusCode.UNAUTHENTICATED, wrong.value.details()
        assert await export(body, timeout=5, metadata=(("x-api-key-bin", API_KEY.encode()),)) == b""


async def test_a_token_configured_with_a_trailing_newline_matches(
    start: GatewayFactory, downstream: Downstream
) -> None:
    """A secret read from a file often ends with a newline, which HTTP cannot carry: configured tokens
    are stripped as presented ones are (it could never match)."""
    gateway = await start(secured_config(downstream, "otlp_http", auth={"bearer_tokens": [f"{TOKEN}\n"]}))
    url = f"http://127.0.0.1:{port_of(gateway)}/v1/traces"
    headers = {"Content-Type": "application/x-protobuf", "Authorization": f"Bearer {TOKEN}"}
    status, reply = await asyncio.to_thread(
        blocking_post, url, make_request(1, 1).SerializeToString(), headers
    )
    assert status == 200, reply
