"""`python -m pipeline new-enricher NAME [--dir DIR]`: scaffold a pip-installable enricher plugin."""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "new-enricher"
HELP = "create a pip-installable enricher plugin package (entry point, settings, README, tests)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the enricher's name, e.g. geo_ip (its fragment's key in every record)")
    parser.add_argument("--dir", default=".", help="where to create the package folder dlp-enricher-NAME (default: here)")


async def main(args: argparse.Namespace) -> int:
    from pipeline.plugin_kit.scaffold import generate, names

    root = generate(args.name, Path(args.dir))  # a refused name or folder: ScaffoldError, reported by the CLI
    values = names(args.name)
    print(f"created {root}")
    print(f"  src/{values['package']}/enricher.py   the enricher ({values['cls']}), its Settings and Fragment")
    print(f"  tests/test_{values['name']}.py        tests using the dlp-pipeline pytest fixtures")
    print("next:")
    print(f"  cd {root} && pip install -e '.[test]' && pytest")
    print(f'  then name it in your pipeline.toml: [[enrichers]] name = "{values["name"]}"')
    return 0
