"""`python -m pipeline run [PATH ...] [--config FILE] [--out DIR]`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator
from importlib.resources import files
from itertools import islice
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, LoadedConfig, load_config
from pipeline.entrypoints.cli import program_name
from pipeline.entrypoints.commands import data_dir_of
from pipeline.entrypoints.progress import Progress
from pipeline.ingest.inputs import check_paths, read_messages
from pipeline.runner import BatchReport, Message, Runner
from pipeline.state.folder_lock import held, local_folders

NAME = "run"
HELP = "run the pipeline over message files (default: the bundled samples)"
SAMPLES = Path(str(files("pipeline").joinpath("samples", "messages")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help=".json (one body), .jsonl (one body per line), .avro (Event Hubs Capture), PT1H.json (storage export), a folder, or - for stdin")
    parser.add_argument("--config", help=f"config file (default: the embedded default, {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name})")
    parser.add_argument("--out", default=None, help="data dir for state, lake and dead letters (default: ./out, or data_dir of the config)")


async def main(args: argparse.Namespace) -> int:
    paths = args.paths or [str(SAMPLES)]
    files = check_paths(paths)
    loaded = load_config(args.config, data_dir=data_dir_of(args))
    total = BatchReport()
    progress = Progress(len(files))  # drawn only when stderr is a terminal
    with held(local_folders(loaded)):  # before the stores open: the lake recovers its journal on open
        async with Runner(loaded) as runner:
            for batch in batches(read_messages(paths, on_file=progress.file_started), runner.config.runner.batch_size):
                report = await runner.process_batch(batch)
                total.merge(report)
                progress.batch_done(report.messages, report.alerts)
            total.merge(await runner.flush())
    progress.close()
    print("\n".join(total.summary_lines()))
    print(f"output:              {loaded.data_dir}")
    hint = all_dead_hint(total, paths) or dead_letter_hint(total, runner.dead_letter.where, loaded, args.config)
    if hint:
        print(hint, file=sys.stderr)
    return 0


def dead_letter_hint(total: BatchReport, where: str, loaded: LoadedConfig, config: str | None) -> str | None:
    """One line when the run dead-lettered anything: how many, `where` the store keeps them, and the
    command that re-drives them once their cause is fixed."""
    count = sum(total.dead_lettered.values())
    if not count:
        return None
    replay = shlex.join(["replay-dead-letters", *(["--config", config] if config else []), "--out", str(loaded.data_dir)])
    stages = ", ".join(f"{stage}={n}" for stage, n in sorted(total.dead_lettered.items()))
    return (
        f"hint: {count} dead letter{'s' if count != 1 else ''} ({stages}) in {where}, each with its stage and reason "
        f"(no matched content); once the cause is fixed (a sink's outage, a config error), "
        f"`{program_name(sys.argv[0])} {replay}` re-drives them; input that cannot be decoded stays there"
    )


def all_dead_hint(total: BatchReport, paths: list[str]) -> str | None:
    """One line when every message of a run of more than one was dead-lettered undecoded: the input is
    more likely read the wrong way (e.g. a pretty-printed JSON document on stdin, read line by line)
    than bad message by message."""
    if total.messages < 2 or total.dead_lettered.get("decode", 0) < total.messages or total.records:
        return None
    stdin = " ('-' reads one message per line: save a pretty-printed document as a .json file, or put each message on one line)" if "-" in paths else ""
    return (
        f"hint: all {total.messages} messages were dead-lettered undecoded; check the input's format: a .json file is one message body, "
        f"a .jsonl file one body per line{stdin}"
    )


def batches(messages: Iterator[Message], size: int) -> Iterator[list[Message]]:
    while batch := list(islice(messages, size)):
        yield batch
