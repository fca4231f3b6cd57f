"""The cluster forward format's cost per span, against decode_protobuf measured in the same run.

Bodies are the benchmark workload's (512 realistic spans each); the sender encodes the span batches a
receiver decoded, the owner decodes them back. Because upb builds a field only when it is read, each
decoder is also timed with the reads the trace buffer makes per span (ids, times, status code): that is
the cost the owner pays. Formats:
  forward   the forward format (sampler.cluster.forward): each message an encoded request of the spans
  rebuild   payloads as a msgpack list; the owner frames them into a request and runs decode_protobuf
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgpack
from workload import BodyStream, build_pool

from sampler.buffer import SpanBatch
from sampler.cluster.forward import SpansMessage, decode_body, encode_body, encode_spans
from sampler.otlp_wire import Scope, encode_request, frame_run
from sampler.receivers.otlp_decode import decode_protobuf


def read_fields(batches: list[SpanBatch]) -> int:
    """What the trace buffer reads of each span, once each (as TraceBuffer.add_spans)."""
    total = 0
    for batch in batches:
        for span, _payload in zip(batch.spans, batch.payloads, strict=True):
            total += len(span.trace_id) + len(span.span_id) + len(span.parent_span_id)
            total += span.start_time_unix_nano + span.end_time_unix_nano + span.status.code
    return total


def records_encode(batches: list[SpanBatch]) -> bytes:
    return encode_body([encode_spans(batches, 1)])


def records_decode(body: bytes) -> list[SpanBatch]:
    batches: list[SpanBatch] = []
    for message in decode_body(body):
        if isinstance(message, SpansMessage):
            batches += message.batches
    return batches


def rebuild_encode(batches: list[SpanBatch]) -> bytes:
    fields = [[b.resource, b.scope, b.resource_payload, list(b.payloads)] for b in batches]
    packed: bytes = msgpack.packb([1, fields], use_bin_type=True)
    return packed


def rebuild_decode(body: bytes) -> list[SpanBatch]:
    _, fields = msgpack.unpackb(body)
    groups = [
        (Scope(resource, scope), frame_run(payloads), len(payloads))
        for resource, scope, _, payloads in fields
    ]
    return decode_protobuf(encode_request(groups))


def best_time(function: Callable[[Any], Any], inputs: list[Any], rounds: int) -> float:
    """Seconds per input, the best of `rounds` passes over all inputs."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for item in inputs:
            function(item)
        best = min(best, (time.perf_counter() - started) / len(inputs))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bodies", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    stream = BodyStream(build_pool(args.bodies))
    bodies = [stream.next_body()[0] for _ in range(args.bodies)]
    decoded = [decode_protobuf(body) for body in bodies]
    spans = sum(len(b.payloads) for batches in decoded for b in batches) / len(bodies)
    body_bytes = sum(map(len, bodies)) / len(bodies)

    def per_span(function: Callable[[Any], Any], inputs: list[Any]) -> float:
        return best_time(function, inputs, args.rounds) / spans * 1e6

    probe = per_span(decode_protobuf, bodies)
    probe_read = per_span(lambda body: read_fields(decode_protobuf(body)), bodies)
    rows: list[tuple[str, float, float, float, float]] = [
        ("decode_protobuf (probe)", 0.0, probe, probe_read, body_bytes / spans)
    ]
    for name, encode, decode in (
        ("forward format", records_encode, records_decode),
        ("rebuild via decode_protobuf", rebuild_encode, rebuild_decode),
    ):
        encoded = [encode(batches) for batches in decoded]
        rows.append(
            (
                name,
                per_span(encode, decoded),
                per_span(decode, encoded),
                per_span(lambda body, decode=decode: read_fields(decode(body)), encoded),
                sum(map(len, encoded)) / len(encoded) / spans,
            )
        )
    print(f"{len(bodies)} bodies of {spans:.0f} spans, {body_bytes / spans:.0f} protobuf bytes per span")
    print("µs per span; '+reads' adds the buffer's field reads, 'vs probe' compares +reads with the probe's;")
    print("'both' is what sender and owner pay together (encode + decode + reads)")
    header = ("format", "encode", "decode", "+reads", "vs probe", "both", "B/span")
    print(f"{header[0]:28s}" + "".join(f"{title:>9s}" for title in header[1:]))
    for name, encode_us, decode_us, read_us, size in rows:
        encode_text = f"{encode_us:9.3f}" if encode_us else f"{'-':>9s}"
        ratio = read_us / probe_read
        both = encode_us + read_us
        print(f"{name:28s}{encode_text}{decode_us:9.3f}{read_us:9.3f}{ratio:8.2f}x{both:9.3f}{size:9.0f}")


if __name__ == "__main__":
    main()
