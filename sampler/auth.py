"""Ingest authentication: whether a request carries one of the configured credentials. Receivers ask before
reading the body; what a client presented is never logged or echoed."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable

from pydantic import SecretStr

from sampler.config import AuthConfig
from sampler.logthrottle import LogThrottle

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
# The challenge a 401 carries when bearer tokens are accepted (RFC 6750).
BEARER_CHALLENGE = "Bearer"

# How a receiver reads a request header (HTTP) or metadata key (gRPC, lower case) by its lower-case name.
# grpc gives the values of `-bin` keys as bytes.
HeaderLookup = Callable[[str], str | bytes | None]


def _digest(value: str | bytes) -> bytes:
    # Compared as digests: equal length whatever was sent, so the comparison time says nothing of the token.
    # aiohttp hands header bytes that are not UTF-8 over surrogate-escaped: encoded back as they came.
    data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return hashlib.sha256(data).digest()


def _digests(values: Iterable[SecretStr]) -> tuple[bytes, ...]:
    # Stripped as what clients present is: a token read from a file with its newline still matches.
    return tuple(_digest(value.get_secret_value().strip()) for value in values)


def _matches(presented: str | bytes, accepted: tuple[bytes, ...]) -> bool:
    digest = _digest(presented)
    matched = False
    for candidate in accepted:
        matched |= hmac.compare_digest(digest, candidate)
    return matched


class Authenticator:
    """One receiver's accepted credentials, kept only as SHA-256 digests."""

    def __init__(self, config: AuthConfig, owner: str) -> None:
        self.owner = owner  # e.g. "OTLP/HTTP receiver", for logs
        self._tokens = _digests(config.bearer_tokens)
        self.header = None if config.header is None else config.header.lower()
        self._header_values = _digests(config.header_values)
        # What a refused client is told to send.
        wanted = []
        if self._tokens:
            wanted.append("Authorization: Bearer <token>")
        if self.header is not None:
            wanted.append(f"the {config.header} header")
        self._wanted = " or ".join(wanted)
        self.challenge = BEARER_CHALLENGE if self._tokens else None
        self._log = LogThrottle()

    def refusal(self, lookup: HeaderLookup) -> str | None:
        """Why a request with these headers is refused, or None when it carries valid credentials."""
        presented = False
        if self._tokens:
            authorization = lookup(AUTHORIZATION)
            if authorization is not None:
                presented = True
                if isinstance(authorization, bytes):  # only `-bin` keys come as bytes; the type allows it
                    authorization = authorization.decode("utf-8", "surrogateescape")
                scheme, _, token = authorization.strip().partition(" ")
                if scheme.lower() == "bearer" and _matches(token.strip(), self._tokens):
                    return None
        if self.header is not None:
            value = lookup(self.header)
            if value is not None:
                presented = True
                if _matches(value.strip(), self._header_values):
                    return None
        if presented:
            return f"invalid credentials; send {self._wanted}"
        return f"no credentials; send {self._wanted}"

    def log_refusal(self, peer: str, reason: str) -> None:
        """Warn (rate-limited) that a request from `peer` was refused for `reason`."""
        if self._log.allow():
            log.warning(
                "%s: refused an unauthenticated request from %s: %s (%d similar messages suppressed)",
                self.owner,
                peer,
                reason,
                self._log.take_suppressed(),
            )
