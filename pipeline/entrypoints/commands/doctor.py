"""`python -m pipeline doctor [--config FILE]`: check every configured component; send nothing."""

from __future__ import annotations

import argparse
import logging

from pipeline.config import DEFAULT_CONFIG, load_config

NAME = "doctor"
HELP = "check every configured component (files, tokens, permissions, tables, streams) with harmless reads; exit 1 if any fails"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"config file (default: the embedded default, {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name})")
    parser.add_argument("--out", default=None, help="data dir (as for run; default: ./out, or data_dir of the config)")


async def main(args: argparse.Namespace) -> int:
    from pipeline.doctor import run_doctor, shown

    if args.verbose == 0:  # the SDKs' own warnings repeat what a failed line says (-v shows them)
        logging.getLogger("azure").setLevel(logging.ERROR)

    loaded = load_config(args.config, data_dir=args.out if args.out is not None else ("out" if args.config is None else None))
    print(f"config: {shown(loaded.file) if loaded.file else loaded.display_name}")
    report = await run_doctor(loaded)
    for result in report.results:
        print(result.line(), flush=True)
    print(report.summary())
    return 1 if report.failed else 0
