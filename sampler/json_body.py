"""JSON request bodies as the decoders read them: what is not UTF-8 JSON, or holds text protobuf cannot, is a
DecodeError.

JSON's `\\ud800` escapes can write a lone UTF-16 surrogate, which Python's json module reads into a str
that is not Unicode text: a protobuf string field refuses it (UnicodeEncodeError) and upb's field-name
lookup fails on it (SystemError), so such a document is refused before it reaches either.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sampler.errors import DecodeError

# An escape of a surrogate code point (U+D800 to U+DFFF), paired or not; unpaired ones are rare enough
# that only a body with one of these is searched in full.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def load_json(body: bytes) -> Any:
    """The parsed document of a JSON body, which must be UTF-8 (RFC 8259), a byte order mark allowed."""
    try:
        # Decoded here, strictly: json.loads would also take UTF-16 and UTF-32, and encoded surrogates.
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DecodeError(f"malformed JSON: not UTF-8: {error}") from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise DecodeError(f"malformed JSON: {error}") from None
    if _SURROGATE_ESCAPE.search(body) and has_lone_surrogate(document):
        raise DecodeError("malformed JSON: a string holds a lone UTF-16 surrogate (\\ud800 to \\udfff)")
    return document


def may_hold_lone_surrogate(text: str) -> bool:
    """Whether JSON text has an escape that could make a lone surrogate (a cheap test before parsing)."""
    return _SURROGATE_ESCAPE_TEXT.search(text) is not None


def has_lone_surrogate(document: Any) -> bool:
    """Whether a parsed JSON document has a string or an object key with a lone surrogate in it.

    Iterative, as the document may be nested as deep as the parser allowed.
    """
    pending = [document]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if not value.isascii() and _SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            pending += value.keys()
            pending += value.values()
        elif isinstance(value, list):
            pending += value
    return False
