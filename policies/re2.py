"""RE2 patterns (the OTel Collector's and Refinery's regular expressions, Go's regexp) for Python's `re`.

Most RE2 syntax means the same in `re`. The parts that do not, and that `re` would read differently
without a word (POSIX classes) or refuse, are rewritten here: `[[:digit:]]` and the other POSIX classes
inside brackets, `$` and `\\z` (the end of the text: `re`'s `$` also matches before a last newline),
`\\Q...\\E` (literal text) and `(?<name>...)` groups. What `re` cannot express the same way (`\\p{Greek}`,
a flag group such as `(?i)` after the start) stays as it is, and compiling it fails with a config error
rather than matching something else.
"""

from __future__ import annotations

import re

# RE2's POSIX classes (ASCII) as the inside of a Python character class.
_POSIX = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_POSIX_CLASS = re.compile(r"\[:(\^?)([a-z]+):\]")
# A flag group turning on multi-line mode, where $ is the end of a line in both.
_MULTILINE = re.compile(r"\(\?[a-zA-Z]*m")


def translate(pattern: str) -> str:
    """`pattern` (RE2) as a Python `re` pattern that matches the same; ValueError for a POSIX class RE2
    does not have, or a negated one inside a larger class."""
    out: list[str] = []
    index = 0
    end = len(pattern)
    multiline = _MULTILINE.search(pattern) is not None
    while index < end:
        char = pattern[index]
        if char == "\\" and index + 1 < end:
            following = pattern[index + 1]
            if following == "Q":
                stop = pattern.find("\\E", index + 2)
                literal = pattern[index + 2 : end if stop < 0 else stop]
                out.append(re.escape(literal))
                index = end if stop < 0 else stop + 2
                continue
            out.append("\\Z" if following == "z" else pattern[index : index + 2])
            index += 2
        elif char == "[":
            index = _bracket(pattern, index, out)
        elif char == "$" and not multiline:
            out.append("\\Z")  # RE2's $ is the end of the text; re's also matches before a last newline
            index += 1
        elif pattern.startswith("(?<", index) and pattern[index + 3 : index + 4] not in ("=", "!"):
            out.append("(?P<")
            index += 3
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _bracket(pattern: str, start: int, out: list[str]) -> int:
    """Copy the bracket expression at `start` to `out`, its POSIX classes rewritten; where it ends."""
    index = start + 1
    negated = pattern.startswith("^", index)
    if negated:
        index += 1
    body: list[str] = []
    first = True
    while index < len(pattern):
        char = pattern[index]
        if char == "]" and not first:
            break
        first = False
        if char == "\\" and index + 1 < len(pattern):
            body.append(pattern[index : index + 2])
            index += 2
            continue
        posix = _POSIX_CLASS.match(pattern, index) if char == "[" else None
        if posix is not None:
            inverted, name = posix.groups()
            if name not in _POSIX:
                raise ValueError(f"unknown POSIX class [:{name}:]")
            if inverted:
                if negated or body or not pattern.startswith("]", posix.end()):
                    raise ValueError(f"[:^{name}:] is supported only as a class of its own, [[:^{name}:]]")
                negated = True
            body.append(_POSIX[name])
            index = posix.end()
            continue
        body.append("\\[" if char == "[" else char)
        index += 1
    else:  # no closing bracket: left for `re` to refuse
        out.append(pattern[start:])
        return len(pattern)
    out.append("[" + ("^" if negated else "") + "".join(body) + "]")
    return index + 1
