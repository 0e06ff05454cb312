"""Backfill inputs of `python -m pipeline run`: Event Hubs Capture Avro files and the Streaming API's
storage-account export (PT1H.json), plus the terminal progress line."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import orjson

from pipeline.entrypoints.progress import Progress
from pipeline.ingest.inputs import parse_capture_time, read_messages, read_storage_export
from tests.entrypoints.test_cli import run_cli, summary
from tests.support.paths import FIXTURES, SAMPLES

# The schema Event Hubs Capture writes (Microsoft docs, "Capture streaming events": avro-tools getschema).
CAPTURE_SCHEMA = {
    "type": "record",
    "name": "EventData",
    "namespace": "Microsoft.ServiceBus.Messaging",
    "fields": [
        {"name": "SequenceNumber", "type": "long"},
        {"name": "Offset", "type": "string"},
        {"name": "EnqueuedTimeUtc", "type": "string"},
        {"name": "SystemProperties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Properties", "type": {"type": "map", "values": ["long", "double", "string", "bytes"]}},
        {"name": "Body", "type": ["null", "bytes"]},
    ],
}


def streaming_records() -> list[dict]:
    return json.loads((FIXTURES / "streaming_dlp_batch.json").read_text())["records"]


def write_capture(path: Path, bodies: list[bytes]) -> None:
    events = [
        {
            "SequenceNumber": 1000 + n,
            "Offset": str(4096 * n),
            "EnqueuedTimeUtc": f"3/14/2025 9:{15 + n:02d}:07 AM",
            "SystemProperties": {"x-opt-enqueued-time": 1741943707000 + n, "x-opt-partition-key": "p"},
            "Properties": {},
            "Body": body,
        }
        for n, body in enumerate(bodies)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(CAPTURE_SCHEMA), events, codec="deflate")


def lake(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "lake").rglob("*.jsonl")) for line in p.read_text().splitlines()]


def test_a_capture_avro_file_runs_through_the_pipeline(tmp_path):
    info, user, file_, app, mde = streaming_records()
    bodies = [
        orjson.dumps({"records": [info, mde]}),  # the split alert's first part, and a non-DLP row
        (SAMPLES / "03-graph-alert.json").read_bytes(),
        b"\x00 not json",
        orjson.dumps({"records": [user, file_, app]}),  # the rest of the split alert, in a later event
    ]
    capture = tmp_path / "capture" / "ns" / "hub" / "0" / "2025" / "03" / "14" / "09" / "15" / "07.avro"
    write_capture(capture, bodies)
    result = run_cli("run", str(tmp_path / "capture"), "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    counts = summary(result.stdout)
    assert counts["messages"] == "4" and counts["dead-lettered"].startswith("1 (decode=1)")
    records = lake(tmp_path / "out")
    by_format = {r["alert"]["source_format"]: r for r in records}
    assert set(by_format) == {"defender_streaming", "graph_alert"}
    joined = [r for r in records if r["alert"]["alert_id"] == info["properties"]["AlertId"] and r["alert"]["kind"] == "alert" and r["alert"]["source_format"] == "defender_streaming"]
    assert len(joined) == 1 and joined[0]["alert"]["user"]["upn"] == "megan.bowen@contoso.com"  # assembled across events
    assert joined[0]["alert"]["files"][0]["name"] == "Q1-payroll-export.xlsx"
    (dead,) = (tmp_path / "out" / "dead-letter").glob("*.json")
    assert "sequence=1002;offset=8192" in dead.read_text()  # the Capture position is kept as the source


def test_capture_records_keep_their_enqueued_time(tmp_path):
    capture = tmp_path / "c.avro"
    write_capture(capture, [b"{}", None])
    first, second = read_messages([str(capture)])
    assert first.enqueued_time == datetime(2025, 3, 14, 9, 15, 7, tzinfo=UTC)
    assert first.source.endswith("c.avro:sequence=1000;offset=0") and first.body == b"{}"
    assert second.body == b""  # a null Body is still a message: the runner dead-letters it


def test_capture_time_formats():
    assert parse_capture_time("12/20/2017 5:52:40 PM") == datetime(2017, 12, 20, 17, 52, 40, tzinfo=UTC)
    assert parse_capture_time("2025-03-14T09:15:07.123Z") == datetime(2025, 3, 14, 9, 15, 7, 123000, tzinfo=UTC)
    assert parse_capture_time("yesterday") is None and parse_capture_time(None) is None


def test_a_file_named_avro_that_is_not_avro_exits_2_before_reading(tmp_path):
    bad = tmp_path / "bad.avro"
    bad.write_bytes(b'{"records": []}')
    result = run_cli("run", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.decode().strip() == f"error: {bad}: not an Avro object container file (Event Hubs Capture)"


def write_export(path: Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\r\n" for line in lines))


def test_storage_account_export_lines_are_grouped_into_envelopes(tmp_path):
    info, user, file_, app, mde = streaming_records()
    export = tmp_path / "insights-logs-advancedhunting-alertinfo" / "tenantId=1111" / "y=2025" / "m=03" / "d=14" / "h=09" / "m=00" / "PT1H.json"
    write_export(export, [orjson.dumps(r) for r in (info, user, mde)] + [b"{broken"] + [orjson.dumps(r) for r in (file_, app)])
    messages = list(read_storage_export(export, per_message=2))
    assert [json.loads(m.body)["records"] if m.body.startswith(b"{\"records\"") else m.body for m in messages] == [
        [info, user], [mde], b"{broken", [file_, app]
    ]
    assert [m.source.rsplit(":", 1)[1] for m in messages] == ["1-2", "3-3", "4", "5-6"]

    result = run_cli("run", str(tmp_path / "insights-logs-advancedhunting-alertinfo"), "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    counts = summary(result.stdout)
    assert counts["records read"] == "5" and counts["dead-lettered"].startswith("1 (decode=1)")
    (record,) = [r for r in lake(tmp_path / "out") if r["alert"]["kind"] == "alert"]
    assert record["alert"]["user"]["upn"] == "megan.bowen@contoso.com" and record["alert"]["files"][0]["name"] == "Q1-payroll-export.xlsx"


def test_a_json_file_of_streaming_records_is_recognised_without_the_pt1h_name(tmp_path):
    info, user, *_ = streaming_records()
    export = tmp_path / "export.json"
    write_export(export, [orjson.dumps(info), orjson.dumps(user)])
    (message,) = read_messages([str(export)])
    assert json.loads(message.body) == {"records": [info, user]}
    ordinary = SAMPLES / "03-graph-alert.json"  # an ordinary one-body file stays one message
    (same,) = read_messages([str(ordinary)])
    assert same.body == ordinary.read_bytes()


class FakeTerminal(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_drawn_only_on_a_terminal():
    ticks = iter(range(100))
    terminal = FakeTerminal(True)
    progress = Progress(4, stream=terminal, interval=0, clock=lambda: float(next(ticks)))
    for name in ("a", "b"):
        progress.file_started(Path(name))
    progress.batch_done(10, 6)
    progress.close()
    text = terminal.getvalue()
    assert text.endswith("\n") and "\r" in text
    assert "[##########..........] 2/4 files  10 messages  6 alerts" in text.splitlines()[-1]
    piped = FakeTerminal(False)
    quiet = Progress(4, stream=piped)
    quiet.file_started(Path("a"))
    quiet.close()
    assert piped.getvalue() == ""


def test_a_log_line_wipes_the_progress_line_first():
    import logging

    terminal = FakeTerminal(True)
    handler = logging.StreamHandler(terminal)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(2, stream=terminal, interval=0)
        progress.file_started(Path("a"))
        drawn = len(progress.line())
        logging.getLogger("pipeline").warning("message 3 dead-lettered")
        progress.close()
    finally:
        root.removeHandler(handler)
    text = terminal.getvalue()
    assert "\r" + " " * drawn + "\rmessage 3 dead-lettered\n" in text
    assert not any(isinstance(f, logging.Filter) and type(f).__name__ == "_ClearLine" for f in handler.filters)
