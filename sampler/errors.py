"""The error types tailgate raises; receivers and the CLI map them to replies and exit codes."""


class TailgateError(Exception):
    """Base of every error tailgate raises on purpose."""


class ConfigError(TailgateError):
    """The configuration is invalid; the message names the key path."""


class DecodeError(TailgateError):
    """A request body cannot be decoded; receivers answer 400 with this message."""


class ExportError(TailgateError):
    """A batch could not be delivered downstream."""
