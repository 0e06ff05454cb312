"""`python -m pipeline report [--lake PATH] [--config FILE] [--since DATE] [--out FILE]`.

Writes one self-contained HTML page (pipeline/lake_report/) over the lake's records: a local folder
or file given with --lake, else every lake sink (kinds jsonl and blob) of the config (default: the
embedded default, whose lake is ./out/lake). Reads only; a Blob lake is copied to a temporary folder
that is removed afterwards. Exit 0 when the page is written, 2 when the lake or a path is unusable.
"""

from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

from pipeline.config import DEFAULT_CONFIG, load_config
from pipeline.lake_report.sources import LakeFile, LakeUnreadable, ReadProgress, download_blob_lake, lakes_of, local_files

NAME = "report"
HELP = "write a DLP posture report (one offline HTML page) over the lake's records"
DEFAULT_OUT = "dlp-report.html"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", help="a lake folder or file (.jsonl, .jsonl.gz, .parquet; default: the lake sinks of the config)")
    parser.add_argument("--config", help=f"config whose lake sinks are read (default: the embedded default, {DEFAULT_CONFIG.parent.name}/{DEFAULT_CONFIG.name}, lake in ./out/lake)")
    parser.add_argument("--since", type=_day, help="only alerts created on or after this UTC day (YYYY-MM-DD)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the HTML file to write (default: {DEFAULT_OUT})")


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a day: give YYYY-MM-DD") from None


async def main(args: argparse.Namespace) -> int:
    from pipeline.lake_report.query import connect, load, summarise
    from pipeline.lake_report.render import render

    progress = ReadProgress()
    with tempfile.TemporaryDirectory(prefix="dlp-report-") as scratch:
        files: list[LakeFile] = []
        sources: list[str] = []
        if args.lake is not None:
            files = local_files(Path(args.lake).expanduser(), args.since)
            sources.append(str(args.lake))
        else:
            loaded = load_config(args.config, data_dir="out" if args.config is None else None)
            for number, lake in enumerate(lakes_of(loaded)):
                sources.append(f"{lake.describe()} (sink {lake.sink})")
                if lake.folder is not None:
                    files += local_files(lake.folder, args.since)
                else:
                    folder = Path(scratch) / str(number)
                    folder.mkdir()
                    files += download_blob_lake(lake.blob, folder, since=args.since, progress=progress)
        if not files:
            raise LakeUnreadable(f"no lake files (.jsonl, .jsonl.gz, .parquet) in {'; '.join(sources)}{' from ' + str(args.since) if args.since else ''}: run the pipeline first, or give --lake PATH")
        con = connect()
        try:
            load(con, files, progress)
            summary = summarise(con, since=args.since, files=len(files))
        finally:
            con.close()
    out = Path(args.out).expanduser()
    out.write_text(render(summary, sources=sources), encoding="utf-8")
    top_user = summary.sections["users"].rows[0][0] if summary.sections["users"].rows else "none"
    top_policy = summary.sections["policies"].rows[0][0] if summary.sections["policies"].rows else "none"
    print(f"report:      {out}")
    print(f"alerts:      {summary.alerts} ({summary.records} records in {summary.files} files)")
    print(f"top user:    {top_user}")
    print(f"top policy:  {top_policy}")
    return 0
