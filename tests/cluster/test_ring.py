"""Ownership of trace ids: consistent across member orders, even, and stable when members come and go."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sampler.cluster.ring import Ring, member_seed, score

MEMBERS = ["10.0.0.1:4319", "10.0.0.2:4319", "10.0.0.3:4319"]


def random_ids(count: int, seed: int = 7) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(count)]


def test_members_are_deduplicated_and_sorted() -> None:
    ring = Ring(["b:1", "a:1", "b:1", "unix:/tmp/x.sock"])
    assert ring.members == ("a:1", "b:1", "unix:/tmp/x.sock")
    assert len(ring) == 3
    assert "b:1" in ring
    assert "c:1" not in ring
    assert 42 not in ring
    assert ring == Ring(["unix:/tmp/x.sock", "a:1", "b:1"])


def test_same_owner_whatever_the_order_of_members() -> None:
    ids = random_ids(2000)
    reference = Ring([*MEMBERS, "unix:/run/tailgate/a.sock"])
    expected = [reference.owner(trace_id) for trace_id in ids]
    rng = random.Random(1)
    for _ in range(5):
        shuffled = [*MEMBERS, "unix:/run/tailgate/a.sock"]
        rng.shuffle(shuffled)
        ring = Ring(shuffled)
        assert [ring.owner(trace_id) for trace_id in ids] == expected


def test_ids_spread_evenly_over_three_members() -> None:
    ids = random_ids(30_000)
    ring = Ring(MEMBERS)
    shares = Counter(ring.owner(trace_id) for trace_id in ids)
    assert set(shares) == set(MEMBERS)
    for member in MEMBERS:
        assert 0.28 < shares[member] / len(ids) < 0.39, shares


def test_a_new_member_takes_ids_only_from_others_never_moving_them_between_old_members() -> None:
    ids = random_ids(20_000)
    before = Ring(MEMBERS)
    after = Ring([*MEMBERS, "10.0.0.4:4319"])
    moved = 0
    for trace_id in ids:
        old, new = before.owner(trace_id), after.owner(trace_id)
        if old != new:
            assert new == "10.0.0.4:4319"
            moved += 1
    # The newcomer takes about a quarter.
    assert 0.20 < moved / len(ids) < 0.30


def test_a_leaving_member_hands_over_only_its_own_ids() -> None:
    ids = random_ids(20_000)
    before = Ring(MEMBERS)
    after = Ring(MEMBERS[:2])
    for trace_id in ids:
        old, new = before.owner(trace_id), after.owner(trace_id)
        if old != "10.0.0.3:4319":
            assert new == old


def test_a_single_member_owns_everything() -> None:
    ring = Ring(["127.0.0.1:4319"])
    assert {ring.owner(trace_id) for trace_id in random_ids(100)} == {"127.0.0.1:4319"}


def test_an_empty_ring_has_no_owner() -> None:
    ring = Ring([])
    assert len(ring) == 0
    with pytest.raises(LookupError):
        ring.owner(bytes(16))


def test_owner_is_the_highest_score() -> None:
    ring = Ring(MEMBERS)
    for trace_id in random_ids(200):
        assert ring.owner(trace_id) == max(MEMBERS, key=lambda member: score(member, trace_id))


# Computed once: every version must keep these, or members of different versions disagree on owners.
PINNED = {
    "00000000000000000000000000000000": "10.0.0.1:4319",
    "ffffffffffffffffffffffffffffffff": "10.0.0.2:4319",
    "000102030405060708090a0b0c0d0e0f": "10.0.0.3:4319",
    "5b8efff798038103d269b633813fc60c": "10.0.0.3:4319",
    "4bf92f3577b34da6a3ce929d0e0e4736": "10.0.0.3:4319",
    "0af7651916cd43dd8448eb211c80319c": "10.0.0.2:4319",
    "80f198ee56343ba864fe8b2a57d3eff7": "10.0.0.3:4319",
    "a3ce929d0e0e47364bf92f3577b34da6": "unix:/run/tailgate/a.sock",
}


def test_owners_are_pinned_across_processes_and_versions() -> None:
    assert member_seed("10.0.0.1:4319") == 14914816541578501179
    assert score("10.0.0.1:4319", bytes(range(16))) == 5744964585902467071
    ring = Ring(["10.0.0.3:4319", "10.0.0.1:4319", "10.0.0.2:4319", "unix:/run/tailgate/a.sock"])
    assert {trace_id: ring.owner(bytes.fromhex(trace_id)) for trace_id in PINNED} == PINNED
