"""probabilistic: the OTel Collector's FNV-1a trace-id hash and threshold, checked independently."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest

from policies.base import Decision
from policies.registry import build_policies
from tests.policies.conftest import config_error

MAX_UINT64 = 2**64 - 1


def reference_fnv1a_64(data: bytes) -> int:
    """FNV-1a 64 straight from its definition."""
    h = 14695981039346656037
    for byte in data:
        h ^= byte
        h = (h * 1099511628211) % 2**64
    return h


def reference_threshold(ratio: float) -> int:
    """Go's big.Float MaxUint64 × ratio: nearest value with a 64-bit mantissa, truncated to uint64."""
    exact = Fraction(MAX_UINT64) * Fraction(ratio)
    if exact <= 0:
        return 0
    scale = 0
    while exact * Fraction(2) ** scale >= 2**64:
        scale -= 1
    while exact * Fraction(2) ** scale < 2**63:
        scale += 1
    scaled = exact * Fraction(2) ** scale
    mantissa = math.floor(scaled)
    rest = scaled - mantissa
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and mantissa % 2 == 1):
        mantissa += 1
    return math.floor(Fraction(mantissa) / Fraction(2) ** scale)


def random_trace_ids(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(count)]


def test_reference_fnv_matches_published_vectors() -> None:
    assert reference_fnv1a_64(b"") == 0xCBF29CE484222325
    assert reference_fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert reference_fnv1a_64(b"foobar") == 0x85944171F73967E8


@pytest.mark.parametrize(
    ("percentage", "salt"),
    [(10, ""), (33.3, ""), (33.3, "my-salt"), (0.5, "x"), (99.9, "")],
)
def test_kept_set_equals_independent_computation(make_trace, percentage, salt) -> None:
    spec = {"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": percentage}}
    if salt:
        spec["probabilistic"]["hash_salt"] = salt
    (policy,) = build_policies([spec], "tail_sampling.policies")
    salt_bytes = (salt or "default-hash-seed").encode()
    threshold = reference_threshold(percentage / 100)
    ids = random_trace_ids(2000, seed=int(percentage * 10))

    kept = {i for i in ids if policy.evaluate(make_trace(trace_id=i), 0.0) is Decision.SAMPLED}
    expected = {i for i in ids if reference_fnv1a_64(salt_bytes + i) <= threshold}

    assert kept == expected
    assert abs(len(kept) / len(ids) - percentage / 100) < 0.03


def test_salt_changes_the_kept_set(make_trace) -> None:
    ids = random_trace_ids(500, seed=7)
    kept = []
    for salt in ("", "other"):
        spec = {"sampling_percentage": 50, "hash_salt": salt}
        (policy,) = build_policies([{"name": "p", "type": "probabilistic", "probabilistic": spec}], "p")
        kept.append({i for i in ids if policy.evaluate(make_trace(trace_id=i), 0) is Decision.SAMPLED})
    assert kept[0] != kept[1]


def test_threshold_uses_go_arithmetic_not_float(build) -> None:
    # float(MaxUint64) * 0.1 truncates to 0x1999999999999a00; Go's 64-bit big.Float gives ...9ff.
    policy = build({"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": 10}})
    assert policy.threshold == 0x19999999999999FF == reference_threshold(0.1)
    assert int(float(MAX_UINT64) * 0.1) != policy.threshold


def test_threshold_matches_reference_over_many_ratios() -> None:
    from policies.probabilistic import calculate_threshold

    rng = random.Random(3)
    ratios = [rng.random() for _ in range(300)] + [10 ** rng.uniform(-15, 0) for _ in range(300)]
    ratios += [0.0, 1.0, 0.5, 0.25, 0.333, 1e-300, 5e-324]
    for ratio in ratios:
        assert calculate_threshold(ratio) == reference_threshold(ratio), ratio


def test_hash_matches_reference_for_other_id_lengths(build) -> None:
    policy = build({"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": 1}})
    for trace_id in (b"", bytes(8), bytes(range(17))):
        assert policy.hash_trace_id(trace_id) == reference_fnv1a_64(b"default-hash-seed" + trace_id)


def test_comparison_is_hash_at_most_threshold(build, make_trace) -> None:
    policy = build({"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": 50}})
    trace = make_trace(trace_id=bytes(range(16)))
    hashed = reference_fnv1a_64(b"default-hash-seed" + trace.trace_id)
    policy.threshold = hashed
    assert policy.evaluate(trace, 0) is Decision.SAMPLED
    policy.threshold = hashed - 1
    assert policy.evaluate(trace, 0) is Decision.NOT_SAMPLED


def test_zero_percent_keeps_only_a_zero_hash(build, make_trace) -> None:
    policy = build({"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": 0}})
    assert policy.threshold == 0
    ids = random_trace_ids(1000, seed=11)
    assert all(policy.evaluate(make_trace(trace_id=i), 0) is Decision.NOT_SAMPLED for i in ids)


def test_hundred_percent_keeps_everything(build, make_trace) -> None:
    policy = build({"name": "p", "type": "probabilistic", "probabilistic": {"sampling_percentage": 100}})
    assert policy.threshold == MAX_UINT64
    ids = random_trace_ids(1000, seed=12)
    assert all(policy.evaluate(make_trace(trace_id=i), 0) is Decision.SAMPLED for i in ids)


@pytest.mark.parametrize(
    ("block", "message"),
    [
        (
            {"sampling_percentage": 100.5},
            "tail_sampling.policies[0].probabilistic.sampling_percentage: "
            "Input should be less than or equal to 100",
        ),
        (
            {"sampling_percentage": -1},
            "tail_sampling.policies[0].probabilistic.sampling_percentage: "
            "Input should be greater than or equal to 0",
        ),
        (
            {"sampling_percentage": "half"},
            "tail_sampling.policies[0].probabilistic.sampling_percentage: "
            "Input should be a valid number, unable to parse string as a number",
        ),
        (None, "tail_sampling.policies[0].probabilistic.sampling_percentage: Field required"),
        (
            {"sampling_percentage": 5, "hash_seed": 1},
            "tail_sampling.policies[0].probabilistic.hash_seed: Extra inputs are not permitted",
        ),
    ],
)
def test_bad_parameters(block, message) -> None:
    spec = {"name": "p", "type": "probabilistic"}
    if block is not None:
        spec["probabilistic"] = block
    assert config_error(spec) == message
