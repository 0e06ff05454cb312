"""`python -m pipeline replay-dead-letters [--config FILE] [--out DIR]`: re-drive dead letters through the pipeline."""

from __future__ import annotations

import argparse

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.entrypoints.commands import data_dir_of
from pipeline.entrypoints.replay import replay_dead_letters
from pipeline.state.folder_lock import held, local_folders

NAME = "replay-dead-letters"
HELP = "re-drive the dead-letter store through the pipeline; an entry is removed once delivered"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help=f"config file (default: the embedded default, {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name})")
    parser.add_argument("--out", default=None, help="data dir for state, lake and dead letters (default: ./out, or data_dir of the config)")


async def main(args: argparse.Namespace) -> int:
    loaded = load_config(args.config, data_dir=data_dir_of(args))
    with held(local_folders(loaded)):
        report = await replay_dead_letters(loaded)
    print("\n".join(report.summary_lines()))
    print(f"output:              {loaded.data_dir}")
    return 0
