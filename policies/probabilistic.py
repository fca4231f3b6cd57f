"""The `probabilistic` policy: keeps a share of traces by hashing the trace id like the Collector.

A trace id and salt get the same verdict on every node, after restarts, and in an OTel Collector
configured alike: FNV-1a 64 over the salt then the trace id, compared with a uint64 threshold.
"""

from __future__ import annotations

from fractions import Fraction
from typing import ClassVar

from pydantic import Field

from policies.base import Decision, ParamsModel, SubPolicyBuilder, TraceView

# The Collector's salt when `hash_salt` is empty or absent.
DEFAULT_HASH_SALT = "default-hash-seed"

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1
# Go's big.Float keeps this many mantissa bits for a value made from math.MaxUint64.
_GO_MANTISSA_BITS = 64


def fnv1a_64(data: bytes, state: int = FNV64_OFFSET) -> int:
    """FNV-1a 64 of `data`, continuing from `state` (the offset basis for a fresh hash)."""
    for byte in data:
        state = ((state ^ byte) * FNV64_PRIME) & _MASK64
    return state


def calculate_threshold(ratio: float) -> int:
    """The Collector's calculateThreshold: MaxUint64 × ratio in Go big.Float arithmetic.

    Go multiplies at 64-bit mantissa precision, rounding half to even, then truncates to uint64;
    this computes the exact product with fractions and rounds the same way, so edge cases agree.
    """
    if not ratio > 0:  # also NaN
        return 0
    product = Fraction(_MASK64) * Fraction(ratio)
    if product >= _MASK64:
        return _MASK64
    # Exponent e with 2**(e-1) <= product < 2**e.
    exponent = product.numerator.bit_length() - product.denominator.bit_length()
    if product >= Fraction(2) ** exponent:
        exponent += 1
    shift = _GO_MANTISSA_BITS - exponent
    # Fraction.__round__ rounds half to even, as big.Float's default ToNearestEven mode.
    mantissa = round(product * Fraction(2) ** shift)
    return mantissa >> shift if shift >= 0 else mantissa << -shift


class ProbabilisticParams(ParamsModel):
    sampling_percentage: float = Field(ge=0, le=100, allow_inf_nan=False)
    hash_salt: str = ""


class Probabilistic:
    """Samples a fixed share of traces by hashing the trace id: the same traces on every node and run."""

    type_name: ClassVar[str] = "probabilistic"
    Params: ClassVar[type[ParamsModel]] = ProbabilisticParams

    def __init__(self, name: str, params: ProbabilisticParams, build_sub: SubPolicyBuilder) -> None:
        self.name = name
        self.attribute_keys: frozenset[str] = frozenset()
        self.sampling_percentage = params.sampling_percentage
        self.threshold = calculate_threshold(params.sampling_percentage / 100)
        self._salt_state = fnv1a_64((params.hash_salt or DEFAULT_HASH_SALT).encode())
        # The state after the first trace-id byte, for each byte value: saves one of the 16 rounds.
        self._after_first = tuple(((self._salt_state ^ b) * FNV64_PRIME) & _MASK64 for b in range(256))

    def hash_trace_id(self, trace_id: bytes) -> int:
        """FNV-1a 64 over the salt then `trace_id`, as the Collector's hashTraceID."""
        try:
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = trace_id
        except ValueError:
            return fnv1a_64(trace_id, self._salt_state)
        # Unrolled, and masked only every third round: the low 64 bits of a product depend only on
        # the low 64 bits of its factors, so masking late gives the result of masking each round;
        # the occasional mask keeps the numbers from growing into slower multi-digit products.
        p = FNV64_PRIME
        h = (self._after_first[b0] ^ b1) * p
        h = (h ^ b2) * p
        h = ((h ^ b3) * p) & _MASK64
        h = (h ^ b4) * p
        h = (h ^ b5) * p
        h = ((h ^ b6) * p) & _MASK64
        h = (h ^ b7) * p
        h = (h ^ b8) * p
        h = ((h ^ b9) * p) & _MASK64
        h = (h ^ b10) * p
        h = (h ^ b11) * p
        h = ((h ^ b12) * p) & _MASK64
        h = (h ^ b13) * p
        h = (h ^ b14) * p
        return ((h ^ b15) * p) & _MASK64

    def keep_probability(self, trace: TraceView) -> float:
        """`sampling_percentage` / 100, the same for every trace."""
        return self.sampling_percentage / 100

    def evaluate(self, trace: TraceView, now: float) -> Decision:
        if self.hash_trace_id(trace.trace_id) <= self.threshold:
            return Decision.SAMPLED
        return Decision.NOT_SAMPLED
