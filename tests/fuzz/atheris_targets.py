"""Coverage-guided fuzzing of the decoders with atheris (libFuzzer), one target per decoder (`make fuzz`).

    python tests/fuzz/atheris_targets.py protobuf -max_total_time=60
    python tests/fuzz/atheris_targets.py zipkin_json -atheris_runs=100000 [corpus directory ...]

Each input goes through the same pipeline as the Hypothesis tests (tests/fuzz/harness.py): a DecodeError
is a normal outcome, anything else raised is a crash, which libFuzzer writes to a file and reports. Without
a corpus directory, a new one in the temporary directory starts from the real seed bodies, with a
dictionary of JSON tokens for the JSON decoders; the remaining arguments are libFuzzer's.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

with atheris.instrument_imports(include=["sampler", "policies"]):
    from tests.fuzz.harness import DECODERS, Pipeline, seeds


def target(decoder: str) -> Callable[[bytes], None]:
    """libFuzzer's TestOneInput for one decoder."""
    decode = DECODERS[decoder]

    def test_one_input(data: bytes) -> None:
        Pipeline().run(decode, data)

    return test_one_input


# Tokens libFuzzer splices into JSON inputs: escapes that are not text, numbers out of every range, the
# keys and tag conventions the decoders look for.
JSON_TOKENS = (
    r'"\ud800"',
    r"\udfff",
    r"\ud83d\ude00",
    r"\u0000",
    "1e400",
    "-0",
    "18446744073709551616",
    "9" * 64,
    "NaN",
    "Infinity",
    "null",
    '"traceId"',
    '"spanId"',
    '"parentSpanId"',
    '"resourceSpans"',
    '"scopeSpans"',
    '"kvlistValue"',
    '"arrayValue"',
    '"startTimeUnixNano"',
    '"id"',
    '"parentId"',
    '"timestamp"',
    '"annotations"',
    '"localEndpoint"',
    '"otlp.link.0"',
    '"otel.status_code"',
    '"w3c.tracestate"',
    "|{}|",
    "ot=th:",
)


def new_corpus(decoder: str) -> list[str]:
    """libFuzzer arguments for a new corpus directory holding the decoder's seed bodies, and for the JSON
    decoders a dictionary."""
    directory = Path(tempfile.mkdtemp(prefix=f"tailgate-fuzz-{decoder}-"))
    for number, body in enumerate(seeds(decoder)):
        (directory / f"seed-{number}").write_bytes(body)
    print(f"corpus: {directory}", file=sys.stderr)
    if "json" not in decoder:
        return [str(directory)]
    dictionary = directory.with_suffix(".dict")
    dictionary.write_text("".join(f"{json.dumps(token)}\n" for token in JSON_TOKENS))
    return [f"-dict={dictionary}", str(directory)]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in DECODERS:
        sys.exit(f"usage: {argv[0]} {{{','.join(DECODERS)}}} [libFuzzer flags] [corpus directory ...]")
    decoder, flags = argv[1], argv[2:]
    if not any(not flag.startswith("-") for flag in flags):
        flags += new_corpus(decoder)
    # The decider logs spans it leaves out; for fuzz inputs that is most of them.
    logging.disable(logging.WARNING)
    atheris.Setup([argv[0], *flags], target(decoder))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
