"""`python -m pipeline validate [--config FILE]`: build every plugin, read no event."""

from __future__ import annotations

import argparse

from pipeline.config import load_config
from pipeline.runner import Runner

NAME = "validate"
HELP = "check a config file and build every plugin, without reading any event"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="config file (default: the embedded default)")
    parser.add_argument("--out", default=None, help="data dir (as for run)")


async def main(args: argparse.Namespace) -> int:
    loaded = load_config(args.config, data_dir=args.out)
    runner = Runner(loaded)
    try:
        names = ", ".join(runner.chain.names) or "none"
        sinks = ", ".join(entry.name for entry, _ in runner.sinks)
        print(f"{loaded.display_name}: ok (enrichers: {names}; sinks: {sinks})")
    finally:
        await runner.aclose()
    return 0
