"""The error types tailgate raises, and config error messages that name the key path."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError


class TailgateError(Exception):
    """Base of every error tailgate raises on purpose."""


class ConfigError(TailgateError):
    """The configuration is invalid; the message names the key path."""


class DecodeError(TailgateError):
    """A request body cannot be decoded; receivers answer 400 with this message."""


class ExportError(TailgateError):
    """A batch could not be delivered downstream."""


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('tail_sampling', 'policies', 2, 'latency') -> 'tail_sampling.policies[2].latency'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith("function-"):
            continue
        else:
            path += f".{part}" if path else part
    return path


def validation_message(
    error: ValidationError,
    prefix: str = "",
    clean_loc: Callable[[tuple[int | str, ...]], tuple[int | str, ...]] | None = None,
) -> str:
    """One line per problem, each `key.path: message`, paths under `prefix`."""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        path = format_loc(clean_loc(loc) if clean_loc else loc)
        if prefix:
            path = f"{prefix}.{path}" if path and not path.startswith("[") else prefix + path
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{path or '<root>'}: {message}")
    return "\n".join(lines)


class PeerOverloaded(TailgateError):
    """Raised by a PeerServer handler that cannot take the spans now; the sender gets 503 and retries
    after `retry_after` seconds (whole seconds on the wire, at least 1)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
