"""sensitive_info: the summary, correlation with rule-match activities seen, and Advanced Hunting."""

from __future__ import annotations

import json
from datetime import UTC

import pytest
from werkzeug import Response

from pipeline.ingest.formats.management_activity import match_key
from pipeline.runner import Message, Runner
from tests.support.alerts import StaticCredential, graph_alert, message
from tests.support.config import LAKE_SINK_TOML
from tests.support.samples import MATCHED_VALUES

MEGAN = "megan.bowen@contoso.com"


def config(extra: str = "") -> str:
    return f"""
[assembly]
settle_seconds = 0
[[enrichers]]
name = "sensitive_info"
[enrichers.settings]
window_minutes = 30
{extra}
""" + LAKE_SINK_TOML


def lake(runner: Runner) -> dict[str, dict]:
    root = runner.loaded.data_path("lake")
    return {json.loads(line)["alert"]["alert_id"]: json.loads(line) for path in root.rglob("*.jsonl") for line in path.read_text().splitlines()}


def bare_alert(alert_id: str, **kw):
    kw.setdefault("upn", MEGAN)
    kw.setdefault("file_name", "Q1-payroll-export.xlsx")
    kw.setdefault("created", "2025-03-14T09:12:44Z")
    return graph_alert(alert_id, **kw)


async def test_alert_without_sit_data_is_filled_from_the_activity_of_the_same_batch(write_config, fixture_bytes):
    async with Runner(write_config(config())) as runner:
        # the alert comes first in the batch: the activity is stored before any alert is looked at
        await runner.process_batch([message(bare_alert("alert-1")), Message(fixture_bytes("mgmt_api_dlp_rule_match.json"))])
        records = lake(runner)
    summary = records["alert-1"]["enrichments"]["sensitive_info"]
    # the activity is filed under the DLP match it belongs to (pipeline/ingest/formats/management_activity.py)
    assert summary["source"] == "correlated" and summary["correlated_ids"] == [match_key(json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json")))]
    assert summary["type_ids"] == ["50842eb7-edc8-4019-85dd-5a5c1f2bb085", "a44669fe-0d48-453d-a9b1-2cc83f2cba77"]
    assert summary["total_count"] == 15 and summary["high_confidence_count"] == 15 and summary["max_confidence"] == 85
    assert summary["categories"] == ["financial", "personal"]


async def test_activity_of_an_earlier_batch_and_names_only_alerts(write_config, fixture_bytes):
    async with Runner(write_config(config())) as runner:
        await runner.process_batch([Message(fixture_bytes("mgmt_api_dlp_rule_match.json"))])
        # Sentinel-like: names without counts -> completed from the activity
        await runner.process_batch([message(bare_alert("names-only", sits="Credit Card Number; U.S. Social Security Number (SSN)"))])
        records = lake(runner)
    summary = records["names-only"]["enrichments"]["sensitive_info"]
    assert summary["source"] == "correlated" and summary["total_count"] == 15


async def test_no_correlation_for_another_file_policy_user_or_time(write_config, fixture_bytes):
    async with Runner(write_config(config())) as runner:
        await runner.process_batch(
            [
                Message(fixture_bytes("mgmt_api_dlp_rule_match.json")),
                message(
                    bare_alert("other-file", file_name="holiday.docx"),
                    bare_alert("other-policy", policy="HR Data"),
                    bare_alert("other-user", upn="adele.vance@contoso.com"),
                    bare_alert("too-late", created="2025-03-14T11:00:00Z"),
                    bare_alert("with-counts", sits="IBAN (2)"),
                ),
            ]
        )
        records = lake(runner)
    for alert_id in ("other-file", "other-policy", "other-user", "too-late"):
        assert records[alert_id]["enrichment_status"]["sensitive_info"]["state"] == "skipped", alert_id
    own = records["with-counts"]["enrichments"]["sensitive_info"]
    assert own["source"] == "alert" and own["type_names"] == ["IBAN"] and own["total_count"] == 2


async def test_correlation_can_be_turned_off(write_config, fixture_bytes):
    async with Runner(write_config(config("correlate = false"))) as runner:
        await runner.process_batch([Message(fixture_bytes("mgmt_api_dlp_rule_match.json")), message(bare_alert("a"))])
        records = lake(runner)
    assert records["a"]["enrichment_status"]["sensitive_info"]["state"] == "skipped"


class HuntingServer:
    def __init__(self, httpserver, rows=None, malformed=False):
        self.rows = rows or []
        self.malformed = malformed
        self.queries: list[str] = []
        httpserver.expect_request("/v1.0/security/runHuntingQuery", method="POST").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/v1.0")

    def handle(self, request):
        self.queries.append(request.get_json()["Query"])
        if self.malformed:
            return Response('{"schema": [], "results": ', content_type="application/json")
        return Response(json.dumps({"schema": [{"name": "RawEventData", "type": "Dynamic"}], "results": self.rows}), content_type="application/json")


def hunting_config(url: str) -> str:
    return config(f'[enrichers.settings.hunting]\nurl = "{url}"\nallow_private_hosts = ["localhost", "127.0.0.1"]')


async def test_hunting_finds_the_rule_match_in_cloud_app_events_without_leaking_values(httpserver, write_config, fixture_bytes):
    raw = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    raw = raw[0] if isinstance(raw, list) else raw
    server = HuntingServer(httpserver, [{"Timestamp": "2025-03-14T09:11:02Z", "ReportId": "r1", "RawEventData": raw}, {"Timestamp": "2025-03-14T09:11:02Z", "RawEventData": "not json"}])
    runner = Runner(write_config(hunting_config(server.url)))
    runner.chain.slots[0].plugin.credential = StaticCredential()
    async with runner:
        await runner.process_batch([message(bare_alert("hunted"))])
        records = lake(runner)
        written = b"".join(p.read_bytes() for p in runner.loaded.data_dir.rglob("*") if p.is_file())
    summary = records["hunted"]["enrichments"]["sensitive_info"]
    assert summary["source"] == "hunting" and summary["total_count"] == 15
    assert "CloudAppEvents" in server.queries[0] and '"megan.bowen@contoso.com"' in server.queries[0]
    for value in MATCHED_VALUES:
        assert value.encode() not in written


async def test_hunting_malformed_answer_fails_only_this_enricher(httpserver, write_config):
    server = HuntingServer(httpserver, malformed=True)
    runner = Runner(write_config(hunting_config(server.url)))
    runner.chain.slots[0].plugin.credential = StaticCredential()
    async with runner:
        report = await runner.process_batch([message(bare_alert("a"))])
        records = lake(runner)
    assert report.delivered["lake"] == 1
    assert records["a"]["enrichment_status"]["sensitive_info"]["state"] == "failed"


def test_correlation_window_is_inclusive_on_both_sides_and_picks_the_newest_content():
    """Activities are held newest first and the window found by bisection: an activity exactly
    `window_minutes` before or after the alert counts, one a second further does not; of two
    contents of one activity, the newest is used."""
    from datetime import datetime

    from enrichers.sensitive_info import SensitiveInfoEnricher, _prepared
    from pipeline.models import DlpAlert
    from pipeline.state.history import HistoryEntry

    enricher = SensitiveInfoEnricher(SensitiveInfoEnricher.Settings(window_minutes=30, correlate=False))
    at = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
    alert = DlpAlert(alert_id="a", source_format="graph_alert", created_at=at, user={"upn": MEGAN}, files=[{"name": "Q1.xlsx"}])

    def activity(entry_id: str, offset_seconds: float, count: int = 1, content: str = "c") -> HistoryEntry:
        return HistoryEntry(
            entry_id=entry_id, content_id=content + entry_id, user=MEGAN, at=at.timestamp() + offset_seconds,
            files=["q1.xlsx"], sensitive_info=[{"name": "IBAN", "count": count}],
        )

    entries = [activity("late-out", 1801), activity("late-in", 1800), activity("revised", 60, count=2, content="new"),
               activity("revised", 30, count=7), activity("early-in", -1800), activity("early-out", -1801)]
    infos, ids, _labels, used = enricher._correlate(alert, _prepared(sorted(entries, key=lambda e: -e.at)))
    assert ids == ["late-in", "revised", "early-in"] and used == 3  # newest first (the newest are kept when the list is cut)
    assert [(i.name, i.count) for i in infos] == [("IBAN", 2)]  # only the newest content of "revised"
    assert enricher._correlate(alert, _prepared([activity("far", 7200)])) is None


@pytest.mark.parametrize("reuse_seconds", [0, 30])
async def test_the_activities_read_per_batch_follow_the_new_ones_not_the_history(tmp_path, reuse_seconds):
    """After a user's first read, a batch reads from the store only the activities written since
    (the rows the store returns counted, not time), whether 200 or 1,000 are stored, and still correlates them all."""
    from datetime import datetime

    from enrichers.sensitive_info import SensitiveInfoEnricher
    from pipeline.models import DlpAlert
    from pipeline.state.history import HistoryEntry
    at = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
    read_after_first: dict[int, int] = {}
    for stored in (200, 1_000):
        settings = {"store": {"path": str(tmp_path / f"history-{stored}.sqlite"), "reuse_seconds": reuse_seconds}}
        enricher = SensitiveInfoEnricher(SensitiveInfoEnricher.Settings.model_validate(settings))
        await enricher.start()
        try:
            await enricher.store.record("activity", [
                HistoryEntry(entry_id=f"act{i}", content_id="c", user=MEGAN, at=at.timestamp() - 3000 + i, files=["q1.xlsx"],
                             sensitive_info=[{"name": "IBAN", "count": 1 + i % 7, "confidence": 85}])
                for i in range(stored)
            ])

            def batch(number: int) -> list[DlpAlert]:
                return [
                    DlpAlert(alert_id=f"a{number}-{i}", source_format="sentinel_alert", created_at=at, user={"upn": MEGAN},
                             files=[{"name": "Q1.xlsx"}], sensitive_info=[{"name": "IBAN"}])
                    for i in range(10)
                ]

            await enricher.enrich_batch(batch(0), [])  # the first read of the user: every stored activity, once
            read_before = enricher.store.rows_read
            for number in range(1, 4):
                results = await enricher.enrich_batch(batch(number), [])
            read_after_first[stored] = enricher.store.rows_read - read_before
            assert results[-1].correlated_count == stored  # every activity counted, the newest 20 listed
            assert results[-1].correlated_ids == sorted(f"act{i}" for i in range(stored - 20, stored))
            assert results[-1].total_count == 7
        finally:
            await enricher.aclose()
    assert read_after_first[200] == read_after_first[1_000] == 0  # nothing new was written


def _activity_entry(entry_id: str, at: float, *, content: str = "c", files=("q1.xlsx",), policy: str | None = "Finance", types=None, labels=()):
    from pipeline.state.history import HistoryEntry

    return HistoryEntry(
        entry_id=entry_id, content_id=content, user=MEGAN, at=at, policy=policy, files=list(files),
        sensitive_info=list(types if types is not None else [{"name": "IBAN", "count": 1, "confidence": 85}]), labels=list(labels),
    )


def test_equal_activities_are_one_group_walked_once_and_the_ids_listed_are_bounded():
    """1,000 equal activities (one kind of document, one policy, one time) are held as one group:
    correlation tests one group, counts all 1,000 and lists the newest `max_correlated_ids`."""
    from datetime import datetime

    from enrichers.sensitive_info import SensitiveInfoEnricher, _prepared
    from pipeline.models import DlpAlert

    at = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
    held = _prepared([_activity_entry(f"act{i:04d}", at.timestamp(), content=f"c{i}") for i in range(1_000)])
    assert len(held) == 1_000 and len(held.between(at.timestamp() - 60, at.timestamp() + 60)) == 1
    enricher = SensitiveInfoEnricher(SensitiveInfoEnricher.Settings(correlate=False, max_correlated_ids=5))
    alert = DlpAlert(alert_id="a", source_format="sentinel_alert", created_at=at, user={"upn": MEGAN}, files=[{"name": "Q1.xlsx"}],
                     sensitive_info=[{"name": "IBAN"}])
    infos, ids, _labels, used = enricher._correlate(alert, held)
    assert used == 1_000 and ids == ["act0999", "act0998", "act0997", "act0996", "act0995"]  # the latest written first
    summary = enricher.summarize(infos, [], source="correlated", ids=ids, count=used)
    assert summary.correlated_count == 1_000 and summary.correlated_ids == sorted(ids)


def _correlated_row_by_row(alert, entries, window: float, limit: int):
    """What `_correlate` answered before activities were grouped: every stored activity walked,
    newest first (at one time, the latest written first), each id at its newest matching content."""
    import orjson

    from enrichers.sensitive_info import merge_types
    from pipeline.state.history import event_time

    at = event_time(alert, 0.0)
    files = {f.name.lower() for f in alert.files if f.name}
    names = {s.name.lower() for s in alert.sensitive_info if s.name}
    matched = {}
    for _written, entry in sorted(enumerate(entries), key=lambda pair: (pair[1].at, pair[0]), reverse=True):
        entry_names = {str(s.get("name", "")).lower() for s in entry.sensitive_info}
        if not at - window <= entry.at <= at + window:
            continue
        if files and entry.files and not files & set(entry.files):
            continue
        if alert.policy_name and entry.policy and alert.policy_name != entry.policy:
            continue
        if names and not names & entry_names:
            continue
        matched.setdefault(entry.entry_id, entry)
    if not matched:
        return None
    types = {orjson.dumps(e.sensitive_info, option=orjson.OPT_SORT_KEYS): e.sensitive_info for e in matched.values()}
    return merge_types(types.values()), list(matched)[:limit], sorted({label for e in matched.values() for label in e.labels}), len(matched)


@pytest.mark.parametrize("seed", range(6))
def test_grouped_correlation_answers_as_walking_every_activity(seed):
    """Against the row-by-row walk, on random activities with revisions (one id, other content or
    time), ties in time, equal and differing types of one name: the same types in the same order,
    labels, count and newest ids; and the same after the oldest rows are dropped."""
    import random
    from datetime import datetime

    from enrichers.sensitive_info import SensitiveInfoEnricher, _prepared
    from pipeline.models import DlpAlert

    rng = random.Random(seed)
    base = datetime(2025, 3, 14, 9, 0, tzinfo=UTC).timestamp()
    type_lists = [
        [{"name": "IBAN", "count": 1, "confidence": 85}],
        [{"name": "IBAN", "count": 4}],
        [{"name": "Credit Card Number", "type_id": "50842eb7", "count": 2, "confidence": 75}, {"name": "IBAN", "count": 2}],
        [{"type_id": "50842eb7", "name": "Card", "count": 9}],
        [],
    ]
    for case in range(40):
        entries = []
        for index in range(rng.randrange(1, 60)):
            entries.append(_activity_entry(
                f"act{rng.randrange(25)}", base + rng.choice((-4000, -1800, -60, 0, 0, 0, 30, 1800, 1801)), content=f"c{case}-{index}",
                files=rng.choice((("q1.xlsx",), ("q1.xlsx", "q2.xlsx"), ("other.docx",), ())), policy=rng.choice(("Finance", "HR", None)),
                types=rng.choice(type_lists), labels=rng.choice(((), ("label-a",), ("label-a", "label-b"))),
            ))
        limit = rng.choice((0, 1, 3, 20))
        enricher = SensitiveInfoEnricher(SensitiveInfoEnricher.Settings(correlate=False, window_minutes=30, max_correlated_ids=limit))
        alert = DlpAlert(
            alert_id="a", source_format="sentinel_alert", created_at=datetime.fromtimestamp(base + rng.choice((0, 60)), tz=UTC), user={"upn": MEGAN},
            files=[{"name": name} for name in rng.choice(((), ("Q1.xlsx",), ("Q2.xlsx",)))], policy_name=rng.choice(("Finance", None)),
            sensitive_info=[{"name": name} for name in rng.choice(((), ("IBAN",), ("Card",)))],
        )
        held = _prepared(entries)
        assert enricher._correlate(alert, held) == _correlated_row_by_row(alert, entries, 30 * 60, limit), case
        cut = rng.choice((base - 4000, base - 60, base))
        held.drop_through(cut)
        assert enricher._correlate(alert, held) == _correlated_row_by_row(alert, [e for e in entries if e.at > cut], 30 * 60, limit), case


def test_the_held_activities_count_and_order_their_rows_as_the_rows_list_does():
    """`_Activities` as `HeldRows`: a row per id and group (a content equal to one held replaces it),
    `at_of` the time of the i-th newest row, `drop_through` every row at or before the cut."""
    from enrichers.sensitive_info import _prepared

    held = _prepared([_activity_entry("a", 10.0), _activity_entry("b", 30.0), _activity_entry("a", 10.0, content="again"),
                      _activity_entry("a", 20.0, content="moved"), _activity_entry("c", 20.0, policy="HR")])
    assert len(held) == 4 and [held.at_of(i) for i in range(4)] == [30.0, 20.0, 20.0, 10.0]
    assert not held.drop_through(5.0) and held.drop_through(20.0)
    assert len(held) == 1 and held.at_of(0) == 30.0


def test_held_activities_that_share_their_lists_have_them_keyed_once(monkeypatch):
    """Activities read from the store share their lists when their contents are equal: `_Activities`
    keys (types dumped, names, files, labels) once per distinct set of lists in an `add`, not once
    per activity, and holds them as it holds activities of equal lists not shared."""
    from enrichers import sensitive_info

    files, labels = ["q1.xlsx"], ["label-a"]
    iban, none = [{"name": "IBAN", "count": 1, "confidence": 85}], []
    shared = [_activity_entry(f"act{i}", 100.0 + i % 2, content=f"c{i}") for i in range(500)] + [_activity_entry(f"other{i}", 100.0, content=f"d{i}") for i in range(500)]
    for number, entry in enumerate(shared):  # one list object per distinct content, as `_stored_entries` gives them
        entry.files, entry.labels, entry.sensitive_info = files, labels, iban if number < 500 else none
    keyed = []
    real = sensitive_info._types_of
    monkeypatch.setattr(sensitive_info, "_types_of", lambda key: keyed.append(key) or real(key))
    held = sensitive_info._prepared(shared)
    assert len(keyed) == 2
    monkeypatch.setattr(sensitive_info, "_types_of", real)
    apart = sensitive_info._prepared([_activity_entry(e.entry_id, e.at, content=e.content_id, files=list(e.files), types=[dict(t) for t in e.sensitive_info],
                                                      labels=list(e.labels)) for e in shared])
    summary = [(g.at, g.files, g.policy, g.names, g.types, g.infos, g.labels, g.ids, g.shares_ids) for g in held.between(0, 1e9)]
    assert summary == [(g.at, g.files, g.policy, g.names, g.types, g.infos, g.labels, g.ids, g.shares_ids) for g in apart.between(0, 1e9)]
    assert len(held) == len(apart) == 1_000 and len(summary) == 3
