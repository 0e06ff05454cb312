"""CLI commands, one module each. A command module defines:

    NAME = "run"
    HELP = "one line"
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    async def main(args: argparse.Namespace) -> int: ...      # returns the exit code

and is listed in COMMANDS below, in the order `--help` shows them.
"""

COMMANDS: list[str] = [
    "pipeline.commands.run",
    "pipeline.commands.schema",
    "pipeline.commands.validate",
    "pipeline.commands.new_enricher",
    "pipeline.commands.replay",
    "pipeline.commands.consume",
]
