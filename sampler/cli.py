"""The `tailgate` command: `run` the gateway, `check-config` a file."""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from sampler.config import Config, load_config
from sampler.errors import ConfigError, TailgateError

EXIT_START_ERROR = 1
EXIT_CONFIG_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailgate", description="Tail-based trace sampling gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", default="config.yaml", help="YAML config file")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", "-c", default="config.yaml", help="YAML config file")
    return parser


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"tailgate: invalid config {path}:\n{error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = _load(args.config)
    unsupported = config.tail_sampling.unsupported_options()
    if args.command == "check-config":
        for note in unsupported:
            print(f"{args.config}: {note}")
        print(f"{args.config}: ok")
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for note in unsupported:
        logging.getLogger("sampler.config").warning("%s", note)
    import uvloop

    from sampler.app import Gateway

    async def serve() -> None:
        await Gateway(config).run_until_signalled()

    # The buffer holds tens of thousands of acyclic objects (traces, span lists) that churn fast; with
    # the default thresholds the cyclic GC rescans them several times a second, costing ~15 % of
    # throughput in `make bench`. Young collections stay frequent enough for aiohttp's cycles.
    gc.set_threshold(50_000, 20, 100)
    try:
        uvloop.run(serve())
    except (OSError, TailgateError) as error:
        print(f"tailgate: cannot start: {error}", file=sys.stderr)
        return EXIT_START_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
