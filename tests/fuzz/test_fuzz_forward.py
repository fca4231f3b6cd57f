"""Fuzzing what members forward to each other: whatever a forward request body holds, a DecodeError (a 400
to the peer) or traces that the buffer merges, the decider decides and the exporters take without raising.

A peer is another member of the same cluster, so the summaries it sends are trusted (a lying span count
makes only the counts wrong); bytes that do not frame spans are found when the trace is kept and left out.
Bodies are mutations of real forward bodies (bit flips, truncation, splices, corrupted lengths) and
random bytes after the format version. Derandomized, as the decoders' fuzz tests.
"""

from __future__ import annotations

from hypothesis import event, given
from hypothesis import strategies as st

from sampler.cluster.forward import (
    FORMAT_VERSION,
    DecisionsMessage,
    ForwardedDecision,
    decode_body,
    encode_body,
    encode_decisions,
    encode_traces,
)
from sampler.errors import DecodeError
from tests.cluster.summarized import summarize
from tests.fuzz.harness import EDIT_KINDS, Pipeline, mutate, seeds
from tests.fuzz.test_fuzz_decoders import fuzz


def forward_seeds() -> tuple[bytes, ...]:
    """Forward bodies of the protobuf seeds' traces (summarized as a member does), and with decisions."""
    bodies = [encode_body([encode_traces(summarize(seed), 1, 77)]) for seed in seeds("protobuf")]
    decision = ForwardedDecision(bytes(range(16)), True, "errors", 0.5)
    bodies.append(
        encode_body([encode_decisions([decision]), encode_traces(summarize(seeds("protobuf")[0]), 2)])
    )
    return tuple(bodies)


SEEDS = forward_seeds()


def merge_and_decide(body: bytes) -> bool:
    """`body` as a member's peer server reads it, its traces merged and decided; False when refused."""
    pipeline = Pipeline()
    try:
        messages = decode_body(body, pipeline.buffer.intern_scope)
    except DecodeError:
        return False
    for message in messages:
        if isinstance(message, DecisionsMessage):
            continue
        pipeline.buffer.add_traces(message.traces)
    traces = pipeline.buffer.pop_all()
    for trace in traces:
        trace.spans()
        trace.span_groups()
    pipeline.decider.decide(traces, None)
    return True


def test_the_seeds_are_read() -> None:
    assert all(merge_and_decide(body) for body in SEEDS)


@fuzz(400)
@given(data=st.data())
def test_mutated_forward_bodies(data: st.DataObject) -> None:
    edit = st.tuples(st.sampled_from(EDIT_KINDS), st.integers(0, 1 << 20), st.integers(0, 1 << 20))
    body = data.draw(
        st.builds(mutate, st.sampled_from(SEEDS), st.lists(edit, min_size=1, max_size=4), st.just(SEEDS))
    )
    event("read" if merge_and_decide(body) else "refused: DecodeError")


@fuzz(150)
@given(tail=st.binary(max_size=2048))
def test_random_bytes_after_the_version(tail: bytes) -> None:
    event("read" if merge_and_decide(bytes([FORMAT_VERSION]) + tail) else "refused: DecodeError")
