"""`python -m pipeline doctor [--config FILE]`: check every configured component; send nothing.

One line per check (pipeline/doctor.py), then a summary naming the failing components. Exit 0 when
no check failed, 1 when one did; 2 (the CLI) for a config file that cannot be read or validated.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.entrypoints.commands import data_dir_of

NAME = "doctor"
HELP = "check every configured component (files, tokens, permissions, tables, streams) with harmless reads; exit 1 if any fails"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"config file (default: the embedded default, {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name})")
    parser.add_argument("--out", default=None, help="data dir (as for run; default: ./out, or data_dir of the config)")


async def main(args: argparse.Namespace) -> int:
    from pipeline.doctor import run_doctor, shown

    if args.verbose == 0:  # the SDKs' own warnings repeat what a failed line says (-v shows them)
        logging.getLogger("azure").setLevel(logging.ERROR)

    loaded = load_config(args.config, data_dir=data_dir_of(args))
    print(f"config: {shown(loaded.file) if loaded.file else loaded.display_name}")
    report = await run_doctor(loaded)
    for result in report.results:
        print(result.line(), flush=True)
    print(report.summary())
    return 1 if report.failed else 0
