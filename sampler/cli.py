"""The `tailgate` command: `run` the gateway, `check-config` a file, `simulate` configs on a capture."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys

from sampler.config import Config, load_config
from sampler.errors import ConfigError, TailgateError
from sampler.workers import parse_worker_slot

EXIT_START_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_CAPTURE_ERROR = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tailgate", description="Tail-based trace sampling gateway")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the gateway")
    run.add_argument("--config", "-c", default="config.yaml", help="YAML config file")
    # Set by the supervisor of `workers: N` for each worker it starts.
    run.add_argument("--worker", type=parse_worker_slot, metavar="INDEX/COUNT", help=argparse.SUPPRESS)
    run.add_argument("--worker-dir", metavar="DIR", help=argparse.SUPPRESS)
    run.add_argument("--supervisor", type=int, metavar="PID", help=argparse.SUPPRESS)
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", "-c", default="config.yaml", help="YAML config file")
    simulate = commands.add_parser(
        "simulate", help="replay captured spans through configs offline and report what each keeps"
    )
    simulate.add_argument("capture", help="OTLP JSON lines: a `capture:` file or a file exporter's output")
    simulate.add_argument(
        "--config", "-c", action="append", required=True, help="YAML config file; repeat to compare configs"
    )
    simulate.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    simulate.add_argument(
        "--kept-ids",
        metavar="FILE",
        help="write the kept trace ids: config, trace id, policy (tab-separated)",
    )
    return parser


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as error:
        print(f"tailgate: invalid config {path}:\n{error}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG_ERROR) from None


def _simulate(args: argparse.Namespace) -> int:
    from sampler.simulate import CaptureError, Progress, kept_id_lines, simulate, to_json, to_table

    configs = [(path, _load(path)) for path in args.config]
    logging.basicConfig(level="WARNING", format="tailgate: %(levelname)s %(name)s: %(message)s")
    for path, config in configs:
        for note in config.tail_sampling.unsupported_options():
            print(f"{path}: {note}", file=sys.stderr)
    try:
        tallies = simulate(args.capture, configs, Progress.for_file(args.capture))
    except CaptureError as error:
        print(f"tailgate: {error}", file=sys.stderr)
        return EXIT_CAPTURE_ERROR
    if args.kept_ids:
        try:
            with open(args.kept_ids, "w") as file:
                file.writelines(kept_id_lines(tallies))
        except OSError as error:
            print(f"tailgate: cannot write {args.kept_ids}: {error.strerror}", file=sys.stderr)
            return EXIT_CAPTURE_ERROR
    if args.format == "json":
        print(json.dumps(to_json(args.capture, tallies), indent=2))
    else:
        print(to_table(tallies), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "simulate":
        return _simulate(args)
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

    if config.workers > 1 and args.worker is None:
        from sampler.workers import run_supervisor

        return run_supervisor(args.config, config)
    worker = None if args.worker is None else (*args.worker, args.worker_dir)

    async def serve() -> None:
        await Gateway(config, args.config, worker, args.supervisor).run_until_signalled()

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
