"""Command line: `python -m pipeline run|validate`.

Exit codes: 0 every message accounted for; 1 a run stopped before it could account for every
message (e.g. the dead-letter store is unwritable; nothing is lost, run again); 2 a bad config or an
unreadable path, reported in one line before any message is read.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.errors import ConfigError, PipelineError
from pipeline.inputs import InputError, check_paths, read_messages
from pipeline.runner import BatchReport, Message, Runner

SAMPLES = Path(__file__).resolve().parent.parent / "samples" / "messages"
EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Enrich Microsoft Purview DLP alerts and deliver them.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug: debug may show payload content)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the pipeline over message files (default: the bundled samples)")
    run.add_argument("paths", nargs="*", metavar="PATH", help=".json (one body), .jsonl (one body per line), a folder, or - for stdin")
    run.add_argument("--config", help=f"config file (default: the embedded default, {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parent.parent)})")
    run.add_argument("--out", default=None, help="data dir for state, lake and dead letters (default: ./out, or data_dir of the config)")

    validate = commands.add_parser("validate", help="check a config file and build every plugin, without reading any event")
    validate.add_argument("--config", help="config file (default: the embedded default)")
    validate.add_argument("--out", default=None, help="data dir (as for run)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "validate":
            return asyncio.run(_validate(args))
        return asyncio.run(_run(args))
    except (ConfigError, InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineError as exc:
        print(f"error: run stopped, not every message is accounted for: {exc}", file=sys.stderr)
        return EXIT_INCOMPLETE


async def _validate(args: argparse.Namespace) -> int:
    loaded = load_config(args.config, data_dir=args.out)
    runner = Runner(loaded)
    try:
        names = ", ".join(runner.chain.names) or "none"
        sinks = ", ".join(entry.name for entry, _ in runner.sinks)
        print(f"{loaded.display_name}: ok (enrichers: {names}; sinks: {sinks})")
    finally:
        await runner.aclose()
    return EXIT_OK


async def _run(args: argparse.Namespace) -> int:
    paths = args.paths or [str(SAMPLES)]
    check_paths(paths)
    loaded = load_config(args.config, data_dir=args.out if args.out is not None else ("out" if args.config is None else None))
    total = BatchReport()
    async with Runner(loaded) as runner:
        for batch in _batches(read_messages(paths), runner.config.runner.batch_size):
            total.merge(await runner.process_batch(batch))
        total.merge(await runner.flush())
    print("\n".join(total.summary_lines()))
    print(f"output:              {loaded.data_dir}")
    return EXIT_OK


def _batches(messages: Iterator[Message], size: int) -> Iterator[list[Message]]:
    while batch := list(islice(messages, size)):
        yield batch
