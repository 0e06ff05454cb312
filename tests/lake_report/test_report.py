"""`python -m pipeline report` over lakes the suite builds: the bundled samples run into a local JSONL
lake, a pseudonymising lake, hand-made revisions and lifecycle fields, and the Blob lake in Azurite
(JSONL.gz and Parquet). The page must name the top users and policies, count alerts once per alert,
keep pseudonyms, show overrides and false-positive reports when the records carry them, and fetch
nothing (tests/lake_report/test_report_browser.py opens it in a real browser)."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.entrypoints.cli import main as cli_main
from pipeline.lake_report.sources import ReadProgress
from tests.support.config import toml_text
from tests.support.paths import ROOT
from tests.support.records import make_record
from tests.support.samples import MATCHED_VALUES

BUNDLED_CONFIG = ROOT / "pipeline" / "samples" / "pipeline.toml"
# The bundled samples' top user and policy (6 of the 8 alerts).
TOP_USER, TOP_POLICY, TOP_RULE = "megan.bowen@contoso.com", "Finance PII", "Finance PII - Credit Card and SSN"
SECOND_USER = "adele.vance@contoso.com"


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it (the test's PYTHONPATH kept, so the libraries it found are found)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env={**os.environ, "PYTHONPATH": path, **(env or {})}, capture_output=True, timeout=180)


def samples_config(folder: Path, sinks: list[dict]) -> Path:
    """The bundled config (its enrichers on the bundled data) with other sinks, written into `folder`."""
    text = BUNDLED_CONFIG.read_text().split("[[sinks]]")[0]
    for relative in ("directory/", "hr/", "telemetry/"):
        text = text.replace(f'"{relative}', f'"{BUNDLED_CONFIG.parent.as_posix()}/{relative}')
    path = folder / "pipeline.toml"
    path.write_text(text + "\n" + toml_text({"sinks": sinks}))
    return path


def report(*args: str) -> int:
    return cli_main(["report", *args])


def page_text(html: str) -> str:
    """The page's visible text, roughly (tags removed)."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def table_rows(html: str, title: str) -> list[list[str]]:
    """The rows of the table beside the chart titled `title`."""
    section = html.split(f"<h2>{title}</h2>", 1)[1].split("<h2>", 1)[0]
    body = section.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [[page_text(cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)] for row in re.findall(r"<tr>(.*?)</tr>", body)]


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory) -> Path:
    """The data dir of `run` over the bundled samples with the embedded defaults (lake in out/lake)."""
    folder = tmp_path_factory.mktemp("bundled")
    result = run_cli("run", cwd=folder)
    assert result.returncode == 0, result.stderr.decode()
    return folder


def test_report_over_the_bundled_run_names_top_users_and_policies(bundled_run):
    """Done when: `report` over the bundled run writes a page that names its top users and policies."""
    result = run_cli("report", cwd=bundled_run)
    assert result.returncode == 0, result.stderr.decode()
    page = (bundled_run / "dlp-report.html").read_text()
    assert f"top user:    {TOP_USER}" in result.stdout.decode() and f"top policy:  {TOP_POLICY}" in result.stdout.decode()
    users = table_rows(page, "Top users")
    assert [row[0] for row in users] == [TOP_USER, SECOND_USER]
    assert users[0][2:5] == ["Finance", "no", "6"] and users[1][2:5] == ["Human Resources", "yes", "2"]  # department, departing flag
    assert table_rows(page, "Top policies")[0][:2] == [TOP_POLICY, "6"]
    assert table_rows(page, "Top rules")[0] == [TOP_RULE, TOP_POLICY, "5"]
    assert {row[0]: row[1] for row in table_rows(page, "Triage bands")} == {"high": "4", "medium": "3", "low": "1"}
    assert {row[0]: row[1] for row in table_rows(page, "Workloads")} == {"SharePoint": "5", "OneDrive": "2", "Endpoint": "1"}
    types = {row[0]: row for row in table_rows(page, "Sensitive information types")}
    assert types["U.S. Social Security Number (SSN)"][1:3] == ["7", "74"] and types["Credit Card Number"][1] == "6"
    per_day = {row[0]: row for row in table_rows(page, "Alerts per day by severity")}
    assert per_day["2025-03-14"][-1] == "5" and sum(int(row[-1]) for row in per_day.values()) == 8
    # every record carries its DLP lifecycle state; the bundled samples hold no override, report or undo
    assert dict(tuple(row) for row in table_rows(page, "Lifecycle states")) == {"matched": "8"}
    assert page.count("<svg") == 8  # a chart beside each table (the lifecycle states one too)


def test_the_page_is_self_contained_and_leaks_nothing(bundled_run, tmp_path):
    out = tmp_path / "page.html"
    assert report("--lake", str(bundled_run / "out" / "lake"), "--out", str(out)) == 0
    page = out.read_text()
    assert "<script" not in page.lower() and not re.search(r"\b(src|href)\s*=", page, re.I) and "url(" not in page and "@import" not in page
    assert "default-src 'none'" in page  # the page's own policy forbids any fetch
    for value in MATCHED_VALUES:
        assert value not in page
    lake = b"".join(p.read_bytes() for p in (bundled_run / "out" / "lake").rglob("*.jsonl"))
    for name in re.findall(rb'"name": ?"([^"]+\.(?:csv|xlsx|docx|pdf|txt))"', lake):
        assert name.decode() not in page  # file names are not part of the report


def test_since_keeps_later_alerts_and_skips_earlier_partitions(bundled_run, tmp_path, capsys):
    out = tmp_path / "since.html"
    assert report("--lake", str(bundled_run / "out" / "lake"), "--since", "2025-03-14", "--out", str(out)) == 0
    page = out.read_text()
    assert sorted(row[0] for row in table_rows(page, "Alerts per day by severity")) == ["2025-03-14", "2025-03-15"]
    assert "alerts:      6 (6 records in 2 files)" in capsys.readouterr().out  # the two earlier partitions not read


def test_revisions_and_duplicates_count_once_latest_wins(tmp_path):
    from datetime import UTC, datetime

    first = make_record("a-1", severity="low").to_dict()
    revised = {**make_record("a-1", severity="high").to_dict(), "record_id": "revision-2", "processed_at": datetime(2025, 3, 15, tzinfo=UTC).isoformat()}
    other = make_record("a-2").to_dict()
    lake = tmp_path / "lake" / "tenant=t" / "date=2025-03-14"
    lake.mkdir(parents=True)
    lines = [json.dumps(doc) for doc in (first, revised, revised, other)] + ["{not json", ""]
    (lake / "records.jsonl").write_text("\n".join(lines))
    out = tmp_path / "r.html"
    assert report("--lake", str(tmp_path / "lake"), "--out", str(out)) == 0
    page = out.read_text()
    cards = dict((label, int(value.replace(",", ""))) for value, label in re.findall(r"<div class='card'><b>([\d,]+)</b>([^<]+)</div>", page))
    assert cards["alerts"] == 2 and cards["records read"] == 4  # the malformed line skipped, not fatal
    policy = first["alert"]["policy_name"]
    assert table_rows(page, "Top policies") == [[policy, "2", "1", "1"]]  # 2 alerts, the revised one high (not low)


def test_overrides_and_false_positive_reports_when_the_records_carry_them(tmp_path):
    base = make_record("m-1").to_dict()
    overridden = {**make_record("m-2").to_dict()}
    overridden["alert"] = {**overridden["alert"], "lifecycle": "overridden", "exception": {"override": True, "justification": "SECRET-JUSTIFICATION"}}
    reported = {**make_record("m-3").to_dict()}
    reported["alert"] = {**reported["alert"], "lifecycle": "reported_false_positive", "exception": {"false_positive": True}}
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "records.jsonl").write_text("\n".join(json.dumps(doc) for doc in (base, overridden, reported)) + "\n")
    out = tmp_path / "r.html"
    assert report("--lake", str(lake), "--out", str(out)) == 0
    page = out.read_text()
    policy = base["alert"]["policy_name"]
    assert table_rows(page, "Overrides and false-positive reports") == [[policy, "3", "1", "1", "0"]]
    assert dict(tuple(row) for row in table_rows(page, "Lifecycle states")) == {"matched": "1", "overridden": "1", "reported_false_positive": "1"}
    assert "SECRET-JUSTIFICATION" not in page


def test_every_rule_of_every_policy_of_an_alert_counts(tmp_path):
    listed = make_record("r-1").to_dict()
    listed["alert"]["policies"] = [{"name": listed["alert"]["policy_name"], "rules": [{"name": "High volume", "severity": "high"}, {"name": "Mid volume", "severity": "medium"}]}]
    plain = make_record("r-2", rule_name="Mid volume").to_dict()
    plain["alert"]["policies"] = []  # a record written before alerts listed their policies: its one rule_name counts
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(doc) for doc in (listed, plain)) + "\n")
    out = tmp_path / "r.html"
    assert report("--lake", str(tmp_path / "records.jsonl"), "--out", str(out)) == 0
    rules = {row[0]: row[2] for row in table_rows(out.read_text(), "Top rules")}
    assert rules == {"Mid volume": "2", "High volume": "1"}


def test_pseudonymised_users_stay_pseudonymised(tmp_path, monkeypatch):
    monkeypatch.setenv("REPORT_TEST_PSEUDONYM_KEY", "k" * 32)
    config = samples_config(tmp_path, [{"name": "lake", "kind": "jsonl", "settings": {"fsync": False}, "pseudonymise": {"key_env": "REPORT_TEST_PSEUDONYM_KEY"}}])
    assert cli_main(["run", "--config", str(config), "--out", str(tmp_path / "data")]) == 0
    # The config's data_dir is its own; the lake is where the run put it.
    out = tmp_path / "r.html"
    assert report("--lake", str(tmp_path / "data" / "lake"), "--out", str(out)) == 0
    page = out.read_text()
    users = table_rows(page, "Top users")
    assert users and all(row[0].startswith("hmac:") for row in users)
    for identifier in (TOP_USER, SECOND_USER, "Megan Bowen", "Adele Vance", "megan.bowen", "adele.vance"):
        assert identifier not in page  # not even from the enrichment's copy of the name
    assert table_rows(page, "Top policies")[0][0] == TOP_POLICY


def test_config_lake_sinks_are_read_and_errors_say_what_to_do(bundled_run, tmp_path, capsys):
    config = samples_config(tmp_path, [{"name": "lake", "kind": "jsonl", "settings": {"path": str(bundled_run / "out" / "lake")}}])
    out = tmp_path / "r.html"
    assert report("--config", str(config), "--out", str(out)) == 0
    assert table_rows(out.read_text(), "Top users")[0][0] == TOP_USER
    capsys.readouterr()

    no_lake = samples_config(tmp_path, [{"name": "x", "kind": "sentinel", "settings": {}}])
    assert report("--config", str(no_lake), "--out", str(out)) == 2
    assert "no lake sink" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert report("--lake", str(empty), "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert "no lake files" in err and "run the pipeline first" in err and "Traceback" not in err


def test_progress_line_counts_files_and_megabytes():
    stream = io.StringIO()
    ticks = iter(range(100))
    progress = ReadProgress(stream=stream, enabled=True, interval=0, clock=lambda: next(ticks))
    progress.start(3, 3_000_000)
    for _ in range(3):
        progress.advance(1_000_000)
    progress.finish()
    last = stream.getvalue().rstrip("\n").split("\r")[-1]
    assert last.startswith("reading lake: 3/3 files  3.0/3.0 MB")
    quiet = io.StringIO()
    ReadProgress(stream=quiet, enabled=False).finish()
    assert quiet.getvalue() == ""  # not a terminal and a quick read: nothing


# -- the Blob lake, in Azurite ---------------------------------------------------------------------


@pytest.fixture
def lake_container(azurite, monkeypatch):
    from azure.storage.blob import BlobServiceClient

    monkeypatch.setenv("TEST_LAKE_CONNECTION", azurite.connection_string)
    name = f"report-{uuid.uuid4().hex[:12]}"
    yield name
    with BlobServiceClient.from_connection_string(azurite.connection_string) as service:
        try:
            service.delete_container(name)
        except Exception:
            pass


@pytest.mark.integration
@pytest.mark.parametrize("lake_format", ["jsonl", "parquet"])
def test_blob_lake_in_azurite(lake_container, lake_format, tmp_path):
    if lake_format == "parquet":
        pytest.importorskip("pyarrow")
    settings = {"connection_string_env": "TEST_LAKE_CONNECTION", "container": lake_container, "create_container": True, "format": lake_format}
    config = samples_config(tmp_path, [{"name": "blob_lake", "kind": "blob", "settings": settings}])
    assert cli_main(["run", "--config", str(config), "--out", str(tmp_path / "data")]) == 0
    out = tmp_path / "r.html"
    assert report("--config", str(config), "--out", str(out)) == 0
    page = out.read_text()
    assert [row[0] for row in table_rows(page, "Top users")] == [TOP_USER, SECOND_USER]
    assert table_rows(page, "Top policies")[0][:2] == [TOP_POLICY, "6"]
    assert f"blob container {lake_container}/enriched" in page
    assert not list(Path(os.environ.get("TMPDIR", "/tmp")).glob("dlp-report-*/0/*"))  # the downloaded copy is removed


@pytest.mark.integration
@pytest.mark.slow  # the read's own brief retries (about 3 s) before it gives up
def test_unreachable_blob_lake_is_one_line_with_what_to_do(tmp_path, monkeypatch, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv(
        "TEST_LAKE_CONNECTION",
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={'a' * 88};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;",
    )
    settings = {"connection_string_env": "TEST_LAKE_CONNECTION", "container": "absent", "timeout_seconds": 2}
    config = samples_config(tmp_path, [{"name": "blob_lake", "kind": "blob", "settings": settings}])
    assert report("--config", str(config), "--out", str(tmp_path / "r.html")) == 2
    err = capsys.readouterr().err
    assert "cannot read the lake" in err and "Storage Blob Data Reader" in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_a_long_range_lists_the_last_days_beside_the_chart_of_all(tmp_path):
    from datetime import UTC, datetime, timedelta

    lake = tmp_path / "records.jsonl"
    start = datetime(2025, 1, 1, 9, tzinfo=UTC)
    lake.write_text("".join(json.dumps(make_record(f"d-{n}", created_at=start + timedelta(days=n)).to_dict()) + "\n" for n in range(40)))
    out = tmp_path / "r.html"
    assert report("--lake", str(lake), "--out", str(out)) == 0
    page = out.read_text()
    days = [row[0] for row in table_rows(page, "Alerts per day by severity")]
    assert len(days) == 31 and days[0] == "2025-01-10" and days[-1] == "2025-02-09"
    assert "the last 31 of 40 days with alerts" in page
    chart = page.split("aria-label='alerts per day'", 1)[1].split("</svg>", 1)[0]
    assert chart.count("<rect") == 40
