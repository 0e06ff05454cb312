"""sensitive_info names types and labels: the record's own names, the config tables, the bundled
table of Microsoft's built-in types, the tenant's own list (Management Activity API) and the
tenant's sensitivity labels (Microsoft Graph), each service a local server keeping to its documented contract."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

from werkzeug import Request, Response

from enrichers.sensitive_info import SensitiveInfoEnricher
from pipeline.models import DlpAlert
from pipeline.runner import Message, Runner
from tests.support.alerts import StaticCredential
from tests.support.config import LAKE_SINK_TOML

CREDIT_CARD = "50842eb7-edc8-4019-85dd-5a5c1f2bb085"
EU_DEBIT_CARD = "0e9b3178-9678-47dd-a509-37222ca96b42"
SSN = "a44669fe-0d48-453d-a9b1-2cc83f2cba77"
CUSTOM = "6f0c1d2e-3a4b-4c5d-8e9f-a0b1c2d3e4f5"
NEWER = "d7c6b5a4-9382-4716-a5b4-c3d2e1f0a9b8"  # a type newer than the bundled table
TENANT = "11111111-2222-3333-4444-555555555555"
CONFIDENTIAL = "99999999-8888-4777-8666-555555555555"
ALL_EMPLOYEES = "4e4234dd-377b-42a3-935b-0e42f138fa23"


def config(extra: str = "") -> str:
    return f"""
[assembly]
settle_seconds = 0
[[enrichers]]
name = "sensitive_info"
[enrichers.settings]
correlate = false
{extra}
""" + LAKE_SINK_TOML


def lake(runner: Runner) -> dict[str, dict]:
    root = runner.loaded.data_path("lake")
    records = [json.loads(line) for path in root.rglob("*.jsonl") for line in path.read_text().splitlines()]
    return {audit_id(record["alert"]): record for record in records}


def audit_id(alert: dict) -> str:
    """The Management Activity record's own `Id` (a match's alert_id is `dlpmatch-…`), else the alert id."""
    events = (alert.get("lifecycle") or {}).get("events") or []
    return events[0].get("record_id") or alert["alert_id"] if events else alert["alert_id"]


def rule_match(fixture_bytes, types: list[tuple[str, str | None]], *, record_id: str = "5f1e2d3c-4b5a-4697-8877-665544332211", labels: list[str] | None = None) -> Message:
    """The fixture's SharePoint rule match with these (type id, name or None) as its sensitive types."""
    raw = json.loads(fixture_bytes("mgmt_api_dlp_rule_match.json"))
    raw = copy.deepcopy(raw[0] if isinstance(raw, list) else raw)
    raw["Id"] = record_id
    raw["SharePointMetaData"]["UniqueID"] = f"document-of-{record_id}"  # each record its own match (one document each)
    template = raw["PolicyDetails"][0]["Rules"][0]["ConditionsMatched"]["SensitiveInformation"][0]
    entries = []
    for type_id, name in types:
        entry = {key: value for key, value in template.items() if key not in ("SensitiveInformationDetections", "SensitiveInformationTypeName")}
        entry["SensitiveType"] = type_id
        if name is not None:
            entry["SensitiveInformationTypeName"] = name
        entries.append(entry)
    raw["PolicyDetails"][0]["Rules"][0]["ConditionsMatched"]["SensitiveInformation"] = entries
    if labels is not None:
        raw.setdefault("SharePointMetaData", {})["SensitivityLabelIds"] = labels
    return Message(json.dumps(raw).encode())


async def summary_of(write_config, messages: list[Message], extra: str = "", *, credential: Any = None, runner_hook=None) -> dict[str, dict]:
    runner = Runner(write_config(config(extra)))
    if credential is not None:
        runner.chain.slots[0].plugin.credential = credential
    async with runner:
        for item in messages:
            await runner.process_batch([item])
        if runner_hook is not None:
            runner_hook(runner)
        records = lake(runner)
    return {alert_id: record["enrichments"].get("sensitive_info", {}) for alert_id, record in records.items()}


def by_id(summary: dict) -> dict[str, dict]:
    return {t["type_id"]: t for t in summary["types"]}


# -- the bundled table and the record's own names -------------------------------------------------


async def test_builtin_type_ids_without_names_are_named_from_the_bundled_table(write_config, fixture_bytes):
    """Why: 50842eb7-… reached every sink with `name: null`, `type_names: []`; 0e9b3178-… (EU Debit
    Card Number) was filed in category "custom"."""
    summaries = await summary_of(write_config, [rule_match(fixture_bytes, [(CREDIT_CARD, None), (EU_DEBIT_CARD, None)])])
    summary = next(iter(summaries.values()))
    types = by_id(summary)
    assert types[CREDIT_CARD]["name"] == "Credit Card Number" and types[CREDIT_CARD]["category"] == "financial"
    assert types[EU_DEBIT_CARD]["name"] == "EU Debit Card Number" and types[EU_DEBIT_CARD]["category"] == "financial"
    assert types[CREDIT_CARD]["name_source"] == "builtin"
    assert summary["type_names"] == ["Credit Card Number", "EU Debit Card Number"]
    assert "custom" not in summary["categories"]


async def test_the_name_the_record_carries_wins_and_the_category_still_comes_from_the_id(write_config, fixture_bytes):
    summaries = await summary_of(write_config, [rule_match(fixture_bytes, [(CREDIT_CARD, "Kreditkartennummer"), (SSN, "U.S. Social Security Number (SSN)")])])
    types = by_id(next(iter(summaries.values())))
    assert types[CREDIT_CARD]["name"] == "Kreditkartennummer" and types[CREDIT_CARD]["name_source"] == "record"
    assert types[CREDIT_CARD]["category"] == "financial" and types[SSN]["category"] == "personal"


async def test_custom_types_are_named_and_filed_from_the_config_table(write_config, fixture_bytes):
    extra = f'[enrichers.settings.custom_types]\n"{CUSTOM.upper()}" = {{ name = "Project Falcon Codes", category = "credentials" }}\n'
    summaries = await summary_of(write_config, [rule_match(fixture_bytes, [(CUSTOM, None), (NEWER, None)])], extra)
    summary = next(iter(summaries.values()))
    types = by_id(summary)
    assert types[CUSTOM]["name"] == "Project Falcon Codes" and types[CUSTOM]["category"] == "credentials" and types[CUSTOM]["name_source"] == "config"
    assert types[NEWER]["name"] is None and types[NEWER]["category"] == "custom" and types[NEWER]["name_source"] is None


def test_the_bundled_table_is_the_documented_one_and_attributes_microsoft():
    from enrichers._names import builtin_types, builtin_types_text

    table = builtin_types()
    assert len(table) == 203
    assert table[CREDIT_CARD] == ("Credit Card Number", "financial")
    assert table[EU_DEBIT_CARD] == ("EU Debit Card Number", "financial")
    assert table["1daa4ad5-e2dd-4ca4-a788-54722c09efb2"] == ("IP Address", "personal")  # not the Ireland page's copy
    assert {category for _name, category in table.values()} == {"financial", "personal", "health", "credentials"}
    header = builtin_types_text().split("\nid,name,category\n")[0]
    assert "CC BY 4.0" in header and "Microsoft" in header and "learn.microsoft.com" in header


def test_the_build_script_rebuilds_the_bundled_table_from_its_source(tmp_path):
    """scripts/build_sensitive_types.py reads the ids as extracted from the Microsoft Learn pages (or
    the pages themselves) and writes the table the enricher reads."""
    import subprocess
    import sys

    from enrichers._names import builtin_types_text
    from tests.support.paths import ROOT

    pages = tmp_path / "pages"
    pages.mkdir()
    (pages / "sit-defn-credit-card-number.md").write_text(f'## XML\n```xml\n<!-- Credit Card Number -->\n<Entity id="{CREDIT_CARD.upper()}" patternsProximity="300">\n```\n')
    (pages / "sit-defn-ireland-drivers-license-number.md").write_text('<!-- IP Address -->\n<Entity id="1daa4ad5-e2dd-4ca4-a788-54722c09efb2">\n')
    (pages / "sit-defn-swift-code.md").write_text('<Entity id="cb2ab58c-9cb8-4c81-baf8-a4e106791df4">\n')
    out = tmp_path / "types.csv"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_sensitive_types.py"), str(pages), "--output", str(out)], capture_output=True, text=True, check=True)
    assert "2 types" in done.stdout
    rows = out.read_text().split("\nid,name,category\n")[1].splitlines()
    assert rows == [f"{CREDIT_CARD},Credit Card Number,financial", "cb2ab58c-9cb8-4c81-baf8-a4e106791df4,SWIFT Code,financial"]
    header = out.read_text().split("\nid,name,category\n")[0]
    assert "CC BY 4.0" in header and header.splitlines()[:4] == builtin_types_text().splitlines()[:4]


# -- the tenant's labels: Microsoft Graph ---------------------------------------------------------

LABELS_PATH = "/v1.0/security/dataSecurityAndGovernance/sensitivityLabels"


class GraphLabelsServer:
    """`GET /security/dataSecurityAndGovernance/sensitivityLabels` as documented: a `value` array of
    sensitivityLabel objects with their `sublabels`, paged with `@odata.nextLink`; `script` gives the
    first answers (429 with Retry-After, 403 with Graph's error body), then the labels."""

    def __init__(self, httpserver, script: list[tuple[int, dict[str, str]]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[Request] = []
        httpserver.expect_request(LABELS_PATH, method="GET").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/v1.0")
        self.page_two = httpserver.url_for(LABELS_PATH) + "?$skiptoken=page2"

    def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if self.script:
            status, headers = self.script.pop(0)
            error = {"error": {"code": "Authorization_RequestDenied" if status == 403 else "TooManyRequests", "message": "refused"}}
            return Response(json.dumps(error), status=status, headers=headers, content_type="application/json")
        if request.args.get("$skiptoken") == "page2":
            return Response(json.dumps({"value": [{"id": "b7a21bba-8197-491f-a5d6-0d0f955397ca", "name": "Public", "sublabels": []}]}), content_type="application/json")
        page = {
            "@odata.context": "https://graph.microsoft.com/v1.0/$metadata#security/dataSecurityAndGovernance/sensitivityLabel",
            "@odata.nextLink": self.page_two,
            "value": [
                {"id": CONFIDENTIAL.upper(), "name": "Confidential", "priority": 20, "isEnabled": True, "applicableTo": "email,teamwork,file",
                 "sublabels": [{"id": ALL_EMPLOYEES, "name": "All Employees", "priority": 21, "isEnabled": True, "sublabels": []}]},
            ],
        }
        return Response(json.dumps(page), content_type="application/json")


def labels_config(url: str, names: str = "") -> str:
    return f"""[enrichers.settings.labels]
{names}
[enrichers.settings.labels.graph]
url = "{url}"
allow_private_hosts = ["localhost", "127.0.0.1"]
"""


async def test_label_ids_are_named_from_the_tenants_labels_in_graph_once_for_many_batches(httpserver, write_config, fixture_bytes):
    """Why: sensitivity labels reached the record as bare ids (`sensitivity_label_ids`), never as names."""
    server = GraphLabelsServer(httpserver)
    credential = StaticCredential()
    messages = [rule_match(fixture_bytes, [(CREDIT_CARD, None)], record_id="rm-1", labels=[CONFIDENTIAL]),
                rule_match(fixture_bytes, [(CREDIT_CARD, None)], record_id="rm-2", labels=[ALL_EMPLOYEES])]
    summaries = await summary_of(write_config, messages, labels_config(server.url), credential=credential)
    assert summaries["rm-1"]["sensitivity_labels"] == [{"id": CONFIDENTIAL, "name": "Confidential", "parent": None, "source": "graph"}]
    assert summaries["rm-1"]["sensitivity_label_names"] == ["Confidential"]
    assert summaries["rm-2"]["sensitivity_labels"] == [{"id": ALL_EMPLOYEES, "name": "All Employees", "parent": "Confidential", "source": "graph"}]
    assert len(server.requests) == 2  # both pages, once: the second batch used the kept list
    assert all(r.headers["Authorization"] == "Bearer test-token" for r in server.requests)
    assert credential.scopes == [("https://graph.microsoft.com/.default",)]


async def test_a_throttled_label_list_is_fetched_after_its_retry_after(httpserver, write_config, fixture_bytes):
    server = GraphLabelsServer(httpserver, script=[(429, {"Retry-After": "1"})])
    summaries = await summary_of(write_config, [rule_match(fixture_bytes, [(CREDIT_CARD, None)], labels=[CONFIDENTIAL])], labels_config(server.url), credential=StaticCredential())
    assert next(iter(summaries.values()))["sensitivity_label_names"] == ["Confidential"]
    assert len(server.requests) == 3  # 429, then the two pages


async def test_a_refused_label_list_falls_back_to_the_config_names_and_is_not_asked_again_every_batch(httpserver, write_config, fixture_bytes, caplog):
    server = GraphLabelsServer(httpserver, script=[(403, {}), (403, {})])
    names = f'names = {{ "{CONFIDENTIAL.upper()}" = "Confidential (from config)" }}'
    messages = [rule_match(fixture_bytes, [(CREDIT_CARD, None)], record_id="rm-1", labels=[CONFIDENTIAL]),
                rule_match(fixture_bytes, [(CREDIT_CARD, None)], record_id="rm-2", labels=[ALL_EMPLOYEES])]
    caplog.set_level(logging.WARNING)
    runner = Runner(write_config(config(labels_config(server.url, names))))
    runner.chain.slots[0].plugin.credential = StaticCredential()
    async with runner:
        for item in messages:
            await runner.process_batch([item])
        records = lake(runner)
    assert {r["enrichment_status"]["sensitive_info"]["state"] for r in records.values()} == {"ok"}
    assert records["rm-1"]["enrichments"]["sensitive_info"]["sensitivity_labels"] == [{"id": CONFIDENTIAL, "name": "Confidential (from config)", "parent": None, "source": "config"}]
    assert records["rm-2"]["enrichments"]["sensitive_info"]["sensitivity_labels"] == [{"id": ALL_EMPLOYEES, "name": None, "parent": None, "source": None}]
    assert len(server.requests) == 1  # the second batch waited for retry_minutes
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "sensitivity labels" in r.getMessage()]
    assert len(warnings) == 1 and "HTTP 403" in warnings[0] and "SensitivityLabel.Read" in warnings[0]
    assert CONFIDENTIAL not in warnings[0] and "megan" not in warnings[0].lower()


# -- the tenant's types: Management Activity API --------------------------------------------------


class TenantTypesServer:
    """`GET {root}/{tenant}/activity/feed/resources/dlpSensitiveTypes` as documented: a JSON array of
    `{"id", "name"}` (names as the API writes them, "CreditCardNumber"), localised by Accept-Language."""

    def __init__(self, httpserver) -> None:
        self.requests: list[Request] = []
        httpserver.expect_request(f"/api/v1.0/{TENANT}/activity/feed/resources/dlpSensitiveTypes", method="GET").respond_with_handler(self.handle)
        self.url = httpserver.url_for("/api/v1.0")

    def handle(self, request: Request) -> Response:
        self.requests.append(request)
        body = [{"id": CREDIT_CARD, "name": "CreditCardNumber"}, {"id": NEWER.upper(), "name": "Passport Number (newer)"}, {"id": CUSTOM, "name": "ProjectFalconCodes"}, {}]
        return Response(json.dumps(body), content_type="application/json")


def tenant_config(url: str) -> str:
    return f"""[enrichers.settings.tenant_types]
tenant_id = "{TENANT}"
url = "{url}"
publisher_identifier = "{TENANT}"
language = "en-US"
allow_private_hosts = ["localhost", "127.0.0.1"]
"""


async def test_the_tenants_list_names_custom_and_newer_types_the_bundled_table_lacks(httpserver, write_config, fixture_bytes):
    server = TenantTypesServer(httpserver)
    credential = StaticCredential()
    summaries = await summary_of(write_config, [rule_match(fixture_bytes, [(CREDIT_CARD, None), (NEWER, None), (CUSTOM, None)])], tenant_config(server.url), credential=credential)
    types = by_id(next(iter(summaries.values())))
    assert types[CREDIT_CARD]["name"] == "Credit Card Number" and types[CREDIT_CARD]["name_source"] == "builtin"
    assert (types[NEWER]["name"], types[NEWER]["name_source"], types[NEWER]["category"]) == ("Passport Number (newer)", "tenant", "personal")
    assert (types[CUSTOM]["name"], types[CUSTOM]["category"]) == ("ProjectFalconCodes", "custom")
    (request,) = server.requests
    assert request.args["PublisherIdentifier"] == TENANT and request.headers["Accept-Language"] == "en-US"
    assert request.headers["Authorization"] == "Bearer test-token" and credential.scopes == [("https://manage.office.com/.default",)]


async def test_the_tenants_list_is_fetched_when_needed_and_once_a_day(httpserver):
    server = TenantTypesServer(httpserver)
    settings = SensitiveInfoEnricher.Settings.model_validate({"correlate": False, "tenant_types": {"tenant_id": TENANT, "url": server.url, "allow_private_hosts": ["localhost", "127.0.0.1"]}})
    enricher = SensitiveInfoEnricher(settings)
    enricher.credential = StaticCredential()
    now = [1_000_000.0]
    enricher._clock = lambda: now[0]

    def alert(type_id: str) -> DlpAlert:
        return DlpAlert(alert_id=f"a-{type_id[:4]}", source_format="management_activity", kind="activity", sensitive_info=[{"type_id": type_id, "count": 1}])

    await enricher.start()
    try:
        await enricher.enrich_batch([alert(CREDIT_CARD)], [])
        assert server.requests == []  # every type named by the bundled table: the list is not needed
        for _ in range(3):
            (summary,) = await enricher.enrich_batch([alert(NEWER)], [])
        assert summary.types[0].name == "Passport Number (newer)" and len(server.requests) == 1
        now[0] += 23 * 3600
        await enricher.enrich_batch([alert(NEWER)], [])
        assert len(server.requests) == 1
        now[0] += 2 * 3600
        await enricher.enrich_batch([alert(NEWER)], [])
        assert len(server.requests) == 2
    finally:
        await enricher.aclose()


def _renaming_enricher(now: list[float]) -> SensitiveInfoEnricher:
    """sensitive_info whose tenant list names NEWER "(first)", then "(second)" once read again (hourly, on `now`)."""
    from enrichers._names import RefreshedTable

    tables = iter([{NEWER: "Passport Number (first)"}, {NEWER: "Passport Number (second)"}])

    async def fetch() -> dict[str, str]:
        return next(tables)

    enricher = SensitiveInfoEnricher(SensitiveInfoEnricher.Settings.model_validate({"correlate": False}))
    enricher.tenant_types = RefreshedTable("tenant types", fetch, refresh_seconds=3600, retry_seconds=60, clock=lambda: now[0], hint="")
    return enricher


async def test_equal_alerts_share_one_summary_across_batches_until_the_tenants_names_are_read_again(monkeypatch):
    """Alerts with equal types share one summary (read-only), in later batches too, while the
    tenant's list in use is the one it was named from: a list read again names them anew. At most
    `SHARED_AT_MOST` summaries are kept."""
    import enrichers.sensitive_info as sensitive_module

    now = [1_000_000.0]
    enricher = _renaming_enricher(now)

    def alert(alert_id: str, type_id: str = NEWER, count: int = 1) -> DlpAlert:
        return DlpAlert(alert_id=alert_id, source_format="management_activity", kind="activity", sensitive_info=[{"type_id": type_id, "count": count}])

    (first,) = await enricher.enrich_batch([alert("a")], [])
    (again,) = await enricher.enrich_batch([alert("b")], [])
    assert again is first and first.types[0].name == "Passport Number (first)"
    now[0] += 2 * 3600  # the list is read again
    (renamed,) = await enricher.enrich_batch([alert("c")], [])
    assert renamed is not first and renamed.types[0].name == "Passport Number (second)"
    monkeypatch.setattr(sensitive_module, "SHARED_AT_MOST", 2)
    for count in range(2, 7):
        (summary,) = await enricher.enrich_batch([alert("d", CREDIT_CARD, count)], [])
        assert summary.total_count == count
    assert len(enricher._shared) == 2


async def test_summaries_of_replaced_name_tables_are_not_kept():
    """Once a summary is found made with a table since replaced, the summaries kept are dropped:
    they could never be shared again, and would only keep the old tables in memory."""
    now = [1_000_000.0]
    enricher = _renaming_enricher(now)

    def alert(alert_id: str, count: int) -> DlpAlert:
        return DlpAlert(alert_id=alert_id, source_format="management_activity", kind="activity", sensitive_info=[{"type_id": NEWER, "count": count}])

    for count in (1, 2, 3):
        await enricher.enrich_batch([alert(f"a{count}", count)], [])
    assert len(enricher._shared) == 3
    old_table = enricher.tenant_types.table
    now[0] += 2 * 3600  # the list is read again
    (renamed,) = await enricher.enrich_batch([alert("b", 1)], [])
    assert renamed.types[0].name == "Passport Number (second)"
    assert len(enricher._shared) == 1 and enricher._shared_tables[0] is not old_table
