"""What forwarding costs per span in the buffer and the forward format, against a span buffered where it
arrives, measured in the same run (no network: `make bench`'s forward cost run has the whole pipeline).

Bodies are the benchmark workload's (512 realistic spans each, 8-span traces). Two members own the trace
ids; the member the bodies reach buffers its own traces and summarizes the others (TraceBuffer.add_spans
with a router), then encodes them (forward.traces_message); their owner decodes the message
(forward.decode_body) and merges the traces into its buffer (TraceBuffer.add_traces).

  here      decode_protobuf + add_spans, one member: µs per span
  sender    decode_protobuf + add_spans with the router, and encoding: µs per span it forwards, its own
            spans counted at the `here` cost
  encode    traces_message alone, per forwarded span
  owner     decode_body + add_traces, per forwarded span
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from workload import BodyStream, build_pool

from sampler.buffer import DecisionCache, TraceBuffer
from sampler.cluster.forward import TracesMessage, body_parts, decode_body, traces_message
from sampler.cluster.ring import Ring
from sampler.config import TailSamplingConfig
from sampler.receivers.otlp_decode import decode_protobuf

HERE, OTHER = "127.0.0.1:1", "127.0.0.1:2"


def fresh_buffer() -> TraceBuffer:
    """A buffer that holds everything it is given (no limit reached, no deadline passes)."""
    settings = TailSamplingConfig(num_traces=10_000_000, max_buffered_spans=100_000_000)
    return TraceBuffer(settings, frozenset(), DecisionCache(100_000, 100_000), lambda: 0.0)


def router(ring: Ring) -> Callable[[bytes], str | None]:
    def foreign_owner(trace_id: bytes) -> str | None:
        owner = ring.owner(trace_id)
        return None if owner == HERE else owner

    return foreign_owner


def best_time(function: Callable[[TraceBuffer, Any], Any], inputs: list[Any], rounds: int) -> float:
    """Seconds for all inputs, the best of `rounds` passes, each into a fresh buffer."""
    best = float("inf")
    for _ in range(rounds):
        buffer = fresh_buffer()
        started = time.perf_counter()
        for item in inputs:
            function(buffer, item)
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bodies", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    stream = BodyStream(build_pool(16))
    bodies = [stream.next_body()[0] for _ in range(args.bodies)]
    spans = sum(len(batch.payloads) for body in bodies for batch in decode_protobuf(body))
    route = router(Ring([HERE, OTHER]))

    def sender(buffer: TraceBuffer, body: bytes) -> list[tuple[bytes, ...]]:
        result = buffer.add_spans(decode_protobuf(body), route)
        return [traces_message(traces, 1) for traces in result.foreign.values()]

    forwarded = [b"".join(body_parts(sender(fresh_buffer(), body))) for body in bodies]
    summaries = [fresh_buffer().add_spans(decode_protobuf(body), route).foreign[OTHER] for body in bodies]
    forwarded_spans = sum(trace.span_count for traces in summaries for trace in traces)

    def owner(buffer: TraceBuffer, body: bytes) -> None:
        for message in decode_body(body, buffer.intern_scope):
            assert isinstance(message, TracesMessage)
            buffer.add_traces(message.traces)

    here = (
        best_time(lambda buffer, body: buffer.add_spans(decode_protobuf(body)), bodies, args.rounds) / spans
    )
    sent = best_time(sender, bodies, args.rounds)
    own_spans = spans - forwarded_spans
    rows = [
        ("here", here),
        ("sender", (sent - own_spans * here) / forwarded_spans),
        (
            "encode",
            best_time(lambda _, traces: traces_message(traces, 1), summaries, args.rounds) / forwarded_spans,
        ),
        ("owner", best_time(owner, forwarded, args.rounds) / forwarded_spans),
    ]
    print(f"{len(bodies)} bodies of {spans / len(bodies):.0f} spans; {forwarded_spans / spans:.0%} forwarded")
    for name, seconds in rows:
        print(f"{name:8s} {seconds * 1e6:7.3f} µs per span")
    extra = rows[1][1] + rows[3][1] - here
    print(
        f"a forwarded span costs {extra * 1e6:.3f} µs more than one buffered where it arrives "
        f"({extra / here:.0%})"
    )


if __name__ == "__main__":
    main()
