"""CLI commands, one module each. A command module defines:

    NAME = "run"
    HELP = "one line"
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    async def main(args: argparse.Namespace) -> int: ...      # returns the exit code

and is listed in COMMANDS below, in the order `--help` shows them.
"""

import argparse

COMMANDS: list[str] = [
    "pipeline.entrypoints.commands.run",
    "pipeline.entrypoints.commands.schema",
    "pipeline.entrypoints.commands.validate",
    "pipeline.entrypoints.commands.new_enricher",
    "pipeline.entrypoints.commands.replay",
    "pipeline.entrypoints.commands.consume",
    "pipeline.entrypoints.commands.doctor",
    "pipeline.entrypoints.commands.report",
]


def data_dir_of(args: argparse.Namespace) -> str | None:
    """The data folder a command uses: `--out`, else `out` for the embedded default config, else
    the one its `--config` names (None)."""
    return args.out if args.out is not None else ("out" if args.config is None else None)
