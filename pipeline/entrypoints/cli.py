"""Command line: `dlp-pipeline COMMAND` once installed, `python -m pipeline COMMAND` from a checkout
(commands live in pipeline/entrypoints/commands/). Usage lines name the command the user typed.

Exit codes: 0 every message accounted for; 1 a run stopped before it could account for every
message (a store busy with another process's lock, a full disk, a sink down for a whole batch;
nothing is lost, run again); 2 a bad config, an unreadable path or one the command cannot write
(e.g. --out), a damaged store file (named, with what to do), or a data folder another process is
writing (pipeline/state/folder_lock.py), reported in one line. No stack trace reaches the user unless -vv is given.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.entrypoints.commands import COMMANDS
from pipeline.errors import ConfigError, DataFolderBusy, PipelineError, StoreDamaged

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2
MODULE_PROG = "python -m pipeline"


def program_name(argv0: str) -> str:
    """How the user invoked the CLI, as usage lines should show it.

    An installed console script (`dlp-pipeline`, or whatever a wrapper names it) is shown by its file
    name; `python -m pipeline` runs pipeline/__main__.py, whose path is argv[0], and is shown as typed.
    """
    path = Path(argv0)
    if not path.name or path.suffix == ".py" or path.name in ("-m", "-c"):
        return MODULE_PROG
    return path.stem if path.suffix.lower() == ".exe" else path.name


def build_parser(prog: str = MODULE_PROG) -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog=prog, description="Enrich Microsoft Purview DLP alerts and deliver them.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v info, -vv debug: debug may show payload content)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text, or one JSON object per line with alert_id and record_id")
    subparsers = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for path in COMMANDS:
        module = importlib.import_module(path)
        module.add_arguments(subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP))
        modules[module.NAME] = module
    return parser, modules


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run one command; `prog` names the CLI in usage lines (default: derived from sys.argv[0])."""
    parser, modules = build_parser(prog or program_name(sys.argv[0] if sys.argv else ""))
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    _configure_telemetry(args.log_format)
    try:
        return asyncio.run(modules[args.command].main(args))
    except (ConfigError, DataFolderBusy, StoreDamaged) as exc:
        # a bad setting, what the command line names (InputError, ScaffoldError, PathUnusable), a busy
        # data folder, a damaged store file: each message says what to do; running again would not help
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineError as exc:
        advice = getattr(exc, "advice", None) or "nothing is lost: run again"
        print(f"error: run stopped, not every message is accounted for: {exc}; {advice}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except KeyboardInterrupt:
        print("interrupted: nothing is lost, run again to finish", file=sys.stderr)
        return EXIT_INCOMPLETE
    except OSError as exc:  # a path the user gave (stores and sinks map their own I/O errors)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:
        if args.verbose >= 2:
            raise
        print(f"error: unexpected {type(exc).__name__} (run again with -vv for the details)", file=sys.stderr)
        return EXIT_INCOMPLETE


def _configure_telemetry(log_format: str) -> None:
    """Alert ids on every log record, JSON lines if asked, Azure Monitor if its connection string is set."""
    from pipeline import observability

    root = logging.getLogger()
    if log_format == "json":
        for handler in root.handlers:
            handler.setFormatter(observability.JsonFormatter())
    observability.install_log_context(root)
    observability.configure_from_env()
