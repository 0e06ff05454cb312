"""`python -m pipeline consume [--config FILE] [--out DIR] [--idle-exit SECONDS]`: the standalone Event Hub consumer."""

from __future__ import annotations

import argparse

from pipeline.config import load_config
from pipeline.entrypoints.consumer import consume
from pipeline.state.folder_lock import held, local_folders

NAME = "consume"
HELP = "read the Event Hub named in [consumer]; checkpoint a partition only once its batch is delivered or dead-lettered"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="config file with a [consumer] table")
    parser.add_argument("--out", default=None, help="data dir for state, lake and dead letters (default: data_dir of the config)")
    parser.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS", help="stop once no event arrived for this long (default: run until stopped)")


async def main(args: argparse.Namespace) -> int:
    from pipeline.runner import Runner

    loaded = load_config(args.config, data_dir=args.out)
    settings = loaded.config.consumer
    if settings is None:
        raise loaded.error("the consume command needs a [consumer] table", key="consumer")
    with held(local_folders(loaded)):
        async with Runner(loaded) as runner:
            handler = await consume(runner, settings, idle_exit_seconds=args.idle_exit)
            handler.total.merge(await runner.flush())
    print(f"batches checkpointed: {handler.batches} (runs that raised and were run again: {handler.failed_runs})")
    print("\n".join(handler.total.summary_lines()))
    return 0
