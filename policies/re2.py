"""RE2 patterns (the OTel Collector's and Refinery's regular expressions, Go's regexp) for Python's `re`.

Most RE2 syntax means the same in `re`. The parts that do not, and that `re` would read differently
without a word or refuse, are rewritten here: the POSIX classes (`[[:digit:]]`) and `\\d`, `\\w`, `\\s`
(ASCII in RE2, Unicode in `re`), `$` and `\\z` as the end of the text outside multi-line mode (`re`'s `$`
also matches before a last newline), `\\Q...\\E` (literal text), `(?<name>...)` groups and `{,n}` (text in
RE2). What RE2 refuses (a backreference) is refused; what `re` cannot express alike (`\\p{Greek}`, a flag
group such as `(?i)` after the start) stays as it is and fails to compile, a config error rather than a
pattern matching something else. `\\b` stays `re`'s, which also counts non-ASCII letters as word
characters.
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
# RE2's Perl classes are ASCII; re's match any Unicode digit, letter or space.
_PERL = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\f\\r "}
# A flag group: `(?flags)` (to the end of the group it is in) or `(?flags:` (a group of its own).
_FLAGS = re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]*))?([:)])")


def translate(pattern: str) -> str:
    """`pattern` (RE2) as a Python `re` pattern that matches the same; ValueError for what RE2 would not
    take (a POSIX class it does not have, a backreference) or `re` could not read alike (a negated POSIX
    or Perl class inside a larger class)."""
    out: list[str] = []
    index = 0
    end = len(pattern)
    # Per open group, whether $ is the end of a line there (multi-line mode), innermost last.
    multiline = [False]
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
            if following in "123456789":
                raise ValueError("backreferences are not RE2")
            if following.lower() in _PERL:
                negated = "^" if following.isupper() else ""
                out.append(f"[{negated}{_PERL[following.lower()]}]")
            else:
                out.append("\\Z" if following == "z" else pattern[index : index + 2])
            index += 2
        elif char == "[":
            index = _bracket(pattern, index, out)
        elif char == "$":
            # RE2's $ is the end of the text; re's also matches before a last newline.
            out.append("$" if multiline[-1] else "\\Z")
            index += 1
        elif char == "(":
            flags = _FLAGS.match(pattern, index)
            inner = multiline[-1]
            if flags is not None:
                on, off, kind = flags.group(1), flags.group(2) or "", flags.group(3)
                inner = (inner or "m" in on) and "m" not in off
                if kind == ")":  # from here to the end of the enclosing group
                    multiline[-1] = inner
                    out.append(flags.group(0))
                    index = flags.end()
                    continue
            multiline.append(inner)
            if pattern.startswith("(?<", index) and pattern[index + 3 : index + 4] not in ("=", "!"):
                out.append("(?P<")
                index += 3
            else:
                out.append(char)
                index += 1
        elif char == ")":
            if len(multiline) > 1:
                multiline.pop()
            out.append(char)
            index += 1
        elif char == "{" and pattern.startswith(",", index + 1):
            out.append("\\{")  # RE2 reads {,n} as text; re as {0,n}
            index += 1
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
            following = pattern[index + 1]
            if following in _PERL:
                body.append(_PERL[following])
            elif following.lower() in _PERL:
                raise ValueError(f"\\{following} inside a class is not supported; use [^...] or [[:^...:]]")
            else:
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
