"""Which member owns a trace id: rendezvous (highest random weight) hashing over the member ids."""

from __future__ import annotations

from collections.abc import Iterable

from xxhash import xxh3_64_intdigest


def member_seed(member: str) -> int:
    """The 64-bit seed a member's scores are hashed with. Part of the wire contract: members of
    different versions must compute the same seeds and scores to agree on owners."""
    return xxh3_64_intdigest(member.encode("utf-8"))


def score(member: str, trace_id: bytes) -> int:
    """How strongly `member` claims `trace_id`; the highest score owns it."""
    return xxh3_64_intdigest(trace_id, member_seed(member))


class Ring:
    """Owners of trace ids among a set of members.

    Every member holding the same set computes the same owner, whatever order the set came in. Adding a
    member moves to it only the ids it now owns; removing one moves only its ids, each to the member with
    the next highest score. Equal scores go to the member first in sorted order.
    """

    def __init__(self, members: Iterable[str]) -> None:
        self.members: tuple[str, ...] = tuple(sorted(set(members)))
        self._member_set = frozenset(self.members)
        self._seeds = tuple((member_seed(member), member) for member in self.members)
        self._only = self.members[0] if len(self.members) == 1 else None
        # Names this set of members in forwarded messages: a member whose ring has the same digest as
        # the sender's owns what it was sent without looking each trace up again. Never 0 ("unknown").
        self.digest = xxh3_64_intdigest("\n".join(self.members).encode("utf-8")) or 1

    def owner(self, trace_id: bytes) -> str:
        """The member that owns `trace_id`; raises LookupError when the ring is empty."""
        if self._only is not None:
            return self._only
        best = -1
        owner = ""
        for seed, member in self._seeds:
            weight = xxh3_64_intdigest(trace_id, seed)
            if weight > best:
                best = weight
                owner = member
        if best < 0:
            raise LookupError("the cluster ring has no members")
        return owner

    def __len__(self) -> int:
        return len(self.members)

    def __contains__(self, member: object) -> bool:
        return member in self._member_set

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ring) and other.members == self.members

    def __hash__(self) -> int:
        return hash(self.members)

    def __repr__(self) -> str:
        return f"Ring({list(self.members)!r})"
