"""`python -m pipeline schema sentinel [--table | --dcr]`: the Sentinel table's columns and a sample row."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

NAME = "schema"
HELP = "print the columns and a sample row of a sink's table (sentinel), to create the table"
SAMPLE = Path(str(files("pipeline").joinpath("samples", "messages", "03-graph-alert.json")))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sink", choices=["sentinel"], help="the sink whose schema to print")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--table", action="store_true", help="print the table definition (deploy/sentinel/table.json)")
    what.add_argument("--dcr", action="store_true", help="print the stream declaration of the DCR")


def sample_row() -> dict:
    from pipeline import __version__
    from pipeline.deliver.sinks.sentinel_schema import to_row
    from pipeline.ingest.decode import decode_message
    from pipeline.models import EnrichedRecord, EnrichmentStatus

    alert = decode_message(SAMPLE.read_bytes()).alerts[0]
    record = EnrichedRecord(
        record_id=alert.content_id(),
        alert=alert,
        enrichments={"triage": {"score": 72.5}},
        enrichment_status={"triage": EnrichmentStatus(state="ok", duration_ms=1.2)},
        pipeline_version=__version__,
        processed_at=datetime(2025, 3, 14, 9, 30, tzinfo=UTC),
    )
    return to_row(record.to_dict())


async def main(args: argparse.Namespace) -> int:
    from pipeline.deliver.sinks.sentinel_schema import COLUMNS, STREAM, TABLE, stream_columns, table_schema

    if args.table:
        print(json.dumps(table_schema(), indent=2))
        return 0
    if args.dcr:
        print(json.dumps({"streamDeclarations": {STREAM: {"columns": stream_columns()}}}, indent=2))
        return 0
    print(f"table {TABLE} (stream {STREAM}), {len(COLUMNS)} columns:")
    width = max(len(name) for name, _, _ in COLUMNS)
    for name, kind, path in COLUMNS:
        source = {"=file_count": "number of alert.files", "=sensitive_count": "sum of alert.sensitive_info[].count"}.get(path, path)
        print(f"  {name:<{width}}  {kind:<8}  {source}")
    print("\nsample row:")
    print(json.dumps(sample_row(), indent=2))
    return 0
