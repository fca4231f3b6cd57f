"""Fuzzing the receivers over the wire: a real gateway (OTLP/HTTP, Zipkin, OTLP/gRPC) gets generated
requests, random content types and encodings, gzip that is corrupt, truncated or a bomb, random and
mutated bodies. Every reply is a success or a 4xx with a message, never a 5xx, and valid requests keep
being served.

Hypothesis runs in a worker thread and sends with blocking clients, while the gateway serves on the
test's event loop; gRPC calls go through a grpc.aio channel on that loop.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc.status_pb2 import Status
from hypothesis import given
from hypothesis import strategies as st

from sampler.app import Gateway
from tests.conftest import Downstream, GatewayFactory, free_port, gateway_config, metric, wait_for
from tests.fuzz.harness import seeds
from tests.fuzz.test_fuzz_decoders import STRUCTURED, fuzz, mutated
from tests.otlp_data import make_request, send
from tests.receivers.test_otlp_grpc import export

EXAMPLES = 100
MAX_REQUEST_BYTES = 64 * 1024
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ENDPOINTS = {"otlp_http": "/v1/traces", "zipkin": "/api/v2/spans"}
DECODERS = {"otlp_http": ("protobuf", "json"), "zipkin": ("zipkin_json", "zipkin_proto3")}
# What a receiver may answer: success (OTLP 200, Zipkin 202) or a client error; never a 5xx.
ALLOWED = {"otlp_http": {200, 400, 413, 415}, "zipkin": {202, 400, 413, 415}}
GRPC_ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def fuzz_config(downstream: Downstream) -> dict[str, Any]:
    """A gateway with every receiver, each with a small request limit, so that bombs stay small."""
    config = gateway_config(downstream)
    receivers = config["receivers"]
    receivers["otlp"]["http"]["max_request_bytes"] = MAX_REQUEST_BYTES
    receivers["otlp"]["grpc"] = {
        "endpoint": f"127.0.0.1:{free_port()}",
        "max_request_bytes": MAX_REQUEST_BYTES,
    }
    receivers["zipkin"] = {"endpoint": f"127.0.0.1:{free_port()}", "max_request_bytes": MAX_REQUEST_BYTES}
    return config


def port(gateway: Gateway, protocol: str) -> int:
    (found,) = [receiver.port for receiver in gateway.receivers if receiver.protocol == protocol]
    assert found is not None
    return found


@dataclass
class Request:
    """One generated POST: headers left out when None."""

    content_type: str | None
    content_encoding: str | None
    body: bytes
    how: str  # what the body is, for the statistics


def gzip_members(body: bytes) -> bytes:
    """`body` as two gzip members, as RFC 1952 allows."""
    half = len(body) // 2
    return gzip.compress(body[:half]) + gzip.compress(body[half:])


# Ways to encode a body for a Content-Encoding (whatever the header says).
ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "plain": lambda body: body,
    "gzip": gzip.compress,
    "gzip-members": gzip_members,
    "gzip-truncated": lambda body: gzip.compress(body)[: max(1, len(gzip.compress(body)) // 2)],
    "gzip-trailing-garbage": lambda body: gzip.compress(body) + b"garbage",
    "deflate": zlib.compress,
    # Small on the wire, over the limit once decompressed.
    "gzip-bomb": lambda body: gzip.compress(b"\x00" * (MAX_REQUEST_BYTES * 4), 9),
    "deflate-bomb": lambda body: zlib.compress(body * (MAX_REQUEST_BYTES // max(1, len(body)) + 2), 9),
}
CONTENT_ENCODINGS = st.sampled_from(
    [None, "identity", "", "gzip", "GZIP", " gzip ", "deflate", "br", "gzip, deflate", "x-gzip", "zstd"]
) | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "",
        PROTOBUF,
        JSON,
        "application/json; charset=utf-8",
        "application/x-protobuf; proto=opentelemetry",
        "APPLICATION/JSON",
        "application/protobuf",
        "text/plain",
        "multipart/form-data; boundary=x",
        "application/json; charset=utf-16",
    ]
) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)


# The Content-Encoding header that goes with each way of encoding a body.
ENCODING_HEADERS = {"plain": None, "deflate": "deflate", "deflate-bomb": "deflate"}


@st.composite
def requests(draw: st.DrawFn, protocol: str) -> Request:
    """A request to `protocol`'s receiver: random or real (often mutated) bodies, encoded some way.

    Headers mostly say what the body is, so that most requests get past them to the decoders; a quarter
    of the time each header is anything.
    """
    decoder = draw(st.sampled_from(DECODERS[protocol]))
    how, body = draw(
        st.tuples(st.just("random"), st.binary(max_size=4096))
        | st.tuples(st.just("valid"), st.sampled_from(seeds(decoder)))
        | st.tuples(st.just("mutated"), mutated(decoder))
        | st.tuples(st.just("generated"), STRUCTURED[decoder])
    )
    encoding = draw(st.sampled_from(sorted(ENCODINGS)))
    content_type = PROTOBUF if "proto" in decoder else JSON
    if draw(st.integers(0, 3)) == 0:
        content_type = draw(CONTENT_TYPES)
    content_encoding = ENCODING_HEADERS.get(encoding, "gzip")
    if draw(st.integers(0, 3)) == 0:
        content_encoding = draw(CONTENT_ENCODINGS)
    return Request(
        content_type=content_type,
        content_encoding=content_encoding,
        body=ENCODINGS[encoding](body),
        how=f"{how} {decoder}, {encoding} as {content_encoding!r}, {content_type!r}",
    )


def post(port: int, path: str, request: Request) -> tuple[int, str, bytes]:
    """POST with a blocking client; the reply's status, content type and body."""
    headers = {"Content-Type": request.content_type, "Content-Encoding": request.content_encoding}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST", path, body=request.body, headers={k: v for k, v in headers.items() if v is not None}
        )
        reply = connection.getresponse()
        return reply.status, reply.headers.get("Content-Type", ""), reply.read()
    finally:
        connection.close()


def error_message(protocol: str, content_type: str, body: bytes) -> str:
    """The message of a refusal: a google.rpc.Status for OTLP (protobuf or JSON), text for Zipkin."""
    if protocol == "zipkin":
        return body.decode()
    if content_type.startswith(PROTOBUF):
        return Status.FromString(body).message
    return str(json.loads(body)["message"])


def valid_request(protocol: str) -> Request:
    decoder = DECODERS[protocol][0]
    return Request(PROTOBUF if decoder == "protobuf" else JSON, None, seeds(decoder)[0], "valid")


async def fuzz_receiver(gateway: Gateway, protocol: str) -> Counter[int]:
    """Send generated requests to one HTTP receiver; the statuses it answered, counted."""
    receiver_port = port(gateway, protocol)
    path = ENDPOINTS[protocol]
    success = min(ALLOWED[protocol])
    statuses: Counter[int] = Counter()

    @fuzz(EXAMPLES)
    @given(requests(protocol))
    def post_one(request: Request) -> None:
        status, content_type, body = post(receiver_port, path, request)
        assert status in ALLOWED[protocol], (status, request.how, body[:300])
        if status != success:
            assert error_message(protocol, content_type, body), (status, request.how)
        statuses[status] += 1
        # The receiver keeps serving: a valid request right after is accepted.
        assert post(receiver_port, path, valid_request(protocol))[0] == success

    await asyncio.to_thread(post_one)
    return statuses


@pytest.mark.parametrize(("protocol", "label"), [("otlp_http", "OTLP/HTTP"), ("zipkin", "Zipkin")])
async def test_http_receiver_answers_every_request_with_2xx_or_4xx(
    downstream: Downstream, start_gateway: GatewayFactory, protocol: str, label: str
) -> None:
    gateway = await start_gateway(fuzz_config(downstream))
    statuses = await fuzz_receiver(gateway, protocol)
    print(f"\n{label} replies to {sum(statuses.values())} requests: {dict(sorted(statuses.items()))}")
    # Every kind of reply was reached: success, malformed, too large, unsupported.
    assert all(statuses[status] for status in ALLOWED[protocol])
    await assert_spans_still_arrive(gateway, downstream, protocol)


GRPC_BODIES = (
    st.binary(max_size=4096)
    | st.sampled_from(seeds("protobuf"))
    | mutated("protobuf")
    | st.builds(lambda size: b"\x0a" * size, st.sampled_from([MAX_REQUEST_BYTES - 1, MAX_REQUEST_BYTES + 1]))
)


async def test_otlp_grpc_receiver_answers_ok_invalid_argument_or_resource_exhausted(
    downstream: Downstream, start_gateway: GatewayFactory
) -> None:
    gateway = await start_gateway(fuzz_config(downstream))
    grpc_port = port(gateway, "otlp_grpc")
    loop = asyncio.get_running_loop()
    codes: Counter[str] = Counter()

    def call(body: bytes, compression: grpc.Compression | None) -> grpc.StatusCode:
        """One Export call on the gateway's loop (grpc.aio lives there); its status code."""
        try:
            asyncio.run_coroutine_threadsafe(export(grpc_port, body, compression), loop).result(10)
        except grpc.aio.AioRpcError as error:
            assert error.details(), error
            return error.code()
        return grpc.StatusCode.OK

    @fuzz(EXAMPLES)
    @given(GRPC_BODIES, st.sampled_from([None, grpc.Compression.Gzip, grpc.Compression.Deflate]))
    def call_one(body: bytes, compression: grpc.Compression | None) -> None:
        code = call(body, compression)
        assert code in GRPC_ALLOWED, (code, body[:100])
        codes[code.name] += 1
        assert call(seeds("protobuf")[0], None) == grpc.StatusCode.OK

    await asyncio.to_thread(call_one)
    print(f"\nOTLP/gRPC codes for {sum(codes.values())} generated calls: {dict(sorted(codes.items()))}")
    assert codes["OK"] and codes["INVALID_ARGUMENT"] and codes["RESOURCE_EXHAUSTED"]
    await assert_spans_still_arrive(gateway, downstream, "otlp_grpc")


async def assert_spans_still_arrive(gateway: Gateway, downstream: Downstream, protocol: str) -> None:
    """After the fuzzing, refusals were counted, and a new trace sent over OTLP/HTTP reaches the backend."""
    assert metric(gateway, "tailgate_receiver_rejected_requests_total", protocol=protocol, reason="malformed")
    request = make_request(traces=1, spans_per_trace=2)
    await send(f"http://127.0.0.1:{port(gateway, 'otlp_http')}/v1/traces", request)
    trace_id = request.resource_spans[0].scope_spans[0].spans[0].trace_id
    await wait_for(lambda: trace_id in downstream.spans_by_trace())
