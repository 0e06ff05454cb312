"""Backfill inputs of `python -m pipeline run`: Event Hubs Capture Avro files and the Streaming API's
storage-account export (PT1H.json), plus the terminal progress line."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import orjson
import pytest

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


def write_capture_in_blocks(path: Path, bodies: list[bytes], per_block: int) -> None:
    """A Capture file of several Avro blocks (`per_block` records each), uncompressed."""
    events = [
        {"SequenceNumber": n, "Offset": str(n), "EnqueuedTimeUtc": "3/14/2025 9:15:07 AM", "SystemProperties": {}, "Properties": {}, "Body": body}
        for n, body in enumerate(bodies)
    ]
    with open(path, "wb") as handle:
        writer = fastavro.write.Writer(handle, fastavro.parse_schema(CAPTURE_SCHEMA), sync_interval=1 << 30)
        for n, event in enumerate(events, start=1):
            writer.write(event)
            if n % per_block == 0:
                writer.flush()
        writer.flush()


def graph_bodies(count: int) -> list[bytes]:
    graph = json.loads((SAMPLES / "03-graph-alert.json").read_text())
    return [orjson.dumps(dict(graph, id=f"capture-{n}")) for n in range(count)]


def damaged_capture(tmp_path: Path, how: str) -> tuple[Path, int]:
    capture = tmp_path / "in" / "damaged.avro"
    capture.parent.mkdir(parents=True)
    write_capture_in_blocks(capture, graph_bodies(20), per_block=10)
    third_block = capture.stat().st_size  # where the third block starts in the file of 30
    write_capture_in_blocks(capture, graph_bodies(30), per_block=10)
    data = bytearray(capture.read_bytes())
    if how == "truncated":
        data = data[: (third_block + len(data)) // 2]  # cut inside the third block
    else:  # garbage over the third block's header
        data[third_block : third_block + 64] = bytes(range(200, 256)) + b"\xff" * 8
    capture.write_bytes(bytes(data))
    return capture, third_block


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_capture_file_gives_its_readable_records_and_one_dead_letter_for_the_rest(tmp_path, how):
    capture, third_block = damaged_capture(tmp_path, how)
    result = run_cli("run", str(capture), "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert "unexpected" not in result.stderr.decode()
    delivered = {r["alert"]["alert_id"] for r in lake(tmp_path / "out")}
    assert delivered == {f"capture-{n}" for n in range(20)}  # the two whole blocks
    (dead,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "dead-letter").glob("*.json")]
    assert dead["reason"] == "damaged_input" and "after 20 record(s)" in dead["detail"]
    note = json.loads(base64.b64decode(dead["body_base64"]))
    assert note["withheld"] == "damaged_input" and note["from_byte"] == third_block and note["bytes"] == capture.stat().st_size - note["from_byte"]
    assert dead["message_index"] == 20
    if how == "truncated":  # a replay leaves the note as it is: only reading the input again brings the records back
        replay = run_cli("replay-dead-letters", "--out", "out", cwd=tmp_path)
        assert replay.returncode == 0, replay.stderr.decode()
        (after,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "dead-letter").glob("*.json")]
        assert (after["reason"], after["body_base64"], after["attempts"]) == ("damaged_input", dead["body_base64"], 2)
        assert [a["reason"] for a in after["replay_attempts"]] == ["damaged_input"]


def test_message_indexes_count_across_the_whole_input(tmp_path):
    """Batches hold 100 messages; a bad line at line 250 of a file (after another file) is message 254."""
    first = tmp_path / "a.jsonl"
    first.write_bytes(b"\n".join(graph_bodies(4)) + b"\n")
    second = tmp_path / "b.jsonl"
    lines = graph_bodies(300)
    lines[249] = b"{broken"
    second.write_bytes(b"\n".join(lines) + b"\n")
    result = run_cli("run", str(first), str(second), "--out", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    (dead,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "dead-letter").glob("*.json")]
    assert dead["source"] == f"{second}:250" and dead["message_index"] == 4 + 249
