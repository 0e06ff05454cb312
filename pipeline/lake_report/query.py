"""The lake's records in an in-memory DuckDB database, and the aggregates the report shows.

Loading: each group of files is read by DuckDB itself (`read_json_objects` for JSON lines, gzip or
not; `read_parquet` and its `record_json` column for Parquet) and only the columns the report needs
are kept, one row per record. A line that is not JSON is skipped (DuckDB's `ignore_errors`).

Counting: a lake holds every revision of an alert (late evidence, an override...: a new record_id,
the same alert) and may hold a record twice (a Blob lake redelivery). The report counts *alerts*:
the latest revision (by processed_at) of each alert key (tenant, source format, kind, alert id).

Fields the records may or may not carry (a minimised sink, an older pipeline, the lifecycle and
exception fields of newer ones) are read as NULL when absent; a section without data says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from pipeline.lake_report.sources import LakeFile, LakeUnreadable, ReadProgress, chunks

# What the report reads from each JSON document: these paths only, extracted in one parse of the
# document. Never the matched values, the justification, file names or paths, or an enrichment's copy
# of the user's name.
_PATHS = {
    "record_id": "$.record_id",
    "tenant": "$.alert.tenant_id",
    "source_format": "$.alert.source_format",
    "kind": "$.alert.kind",
    "alert_id": "$.alert.alert_id",
    "processed_at": "$.processed_at",
    "created_at": "$.alert.created_at",
    "first_activity_at": "$.alert.first_activity_at",
    "severity": "$.alert.severity",
    "upn": "$.alert.user.upn",
    "object_id": "$.alert.user.object_id",
    "display_name": "$.alert.user.display_name",
    "department": "$.enrichments.user_context.department",
    "departing": "$.enrichments.user_context.departing",
    "policy": "$.alert.policy_name",
    "rule": "$.alert.rule_name",
    "policies": "$.alert.policies",
    "workload": "$.alert.workload",
    "band": "$.enrichments.triage.band",
    "score": "$.enrichments.triage.score",
    "sensitive_types": "$.enrichments.sensitive_info.types",
    "alert_sensitive": "$.alert.sensitive_info",
    "alert_lifecycle": "$.alert.lifecycle",
    "lifecycle": "$.lifecycle",
    "alert_exception": "$.alert.exception",
    "exception": "$.exception",
}
_AT = {name: index + 1 for index, name in enumerate(_PATHS)}


def _json(name: str) -> str:
    return f"v[{_AT[name]}]"


def _text(name: str) -> str:
    return f"({_json(name)}->>'$')"


def _state(name: str) -> str:
    """A lifecycle given as a string, or as an object with a `state`."""
    return f"CASE WHEN json_type({_json(name)}) = 'OBJECT' THEN {_json(name)}->>'$.state' ELSE {_text(name)} END"


def _of_type(kind: str, *names: str) -> str:
    return "CASE " + " ".join(f"WHEN json_type({_json(n)}) = '{kind}' THEN {_json(n)}" for n in names) + " END"


_COLUMNS = f"""
    {_text("record_id")} AS record_id,
    concat_ws(chr(31), coalesce({_text("tenant")}, ''), coalesce({_text("source_format")}, ''), coalesce({_text("kind")}, ''),
              coalesce({_text("alert_id")}, {_text("record_id")})) AS alert_key,
    TRY_CAST({_text("processed_at")} AS TIMESTAMPTZ) AS processed_at,
    TRY_CAST(coalesce({_text("created_at")}, {_text("first_activity_at")}, {_text("processed_at")}) AS TIMESTAMPTZ) AS alert_at,
    lower({_text("severity")}) AS severity,
    coalesce({_text("upn")}, {_text("object_id")}) AS user_key,
    {_text("display_name")} AS display_name,
    {_text("department")} AS department,
    TRY_CAST({_text("departing")} AS BOOLEAN) AS departing,
    {_text("policy")} AS policy,
    {_text("rule")} AS rule,
    {_of_type("ARRAY", "policies")} AS policies,
    {_text("workload")} AS workload,
    lower({_text("band")}) AS band,
    TRY_CAST({_text("score")} AS DOUBLE) AS score,
    {_of_type("ARRAY", "sensitive_types", "alert_sensitive")} AS sensitive,
    lower(coalesce({_state("alert_lifecycle")}, {_state("lifecycle")})) AS lifecycle,
    {_of_type("OBJECT", "alert_exception", "exception")} AS exception
"""
_EXTRACT = "json_extract(j, [" + ", ".join(f"'{path}'" for path in _PATHS.values()) + "]) AS v"

SEVERITIES = ("high", "medium", "low", "informational")
BANDS = ("critical", "high", "medium", "low")


@dataclass
class Section:
    """One chart and its table: column names and rows, largest first unless the order is by time."""

    title: str
    columns: list[str]
    rows: list[tuple[Any, ...]]
    note: str = ""


@dataclass
class Summary:
    files: int = 0
    records: int = 0
    alerts: int = 0
    users: int = 0
    first_day: date | None = None
    last_day: date | None = None
    since: date | None = None
    has_lifecycle: bool = False
    per_day: list[tuple[date, dict[str, int]]] = field(default_factory=list)
    sections: dict[str, Section] = field(default_factory=dict)


def connect() -> Any:
    """An in-memory database with an empty `records` table. Needs duckdb (requirements.txt)."""
    try:
        import duckdb
    except ImportError:
        raise LakeUnreadable("the report needs the duckdb package: pip install -r requirements.txt (or pip install duckdb)") from None

    con = duckdb.connect(":memory:")
    con.execute("SET threads = 2")
    con.execute(
        "CREATE TABLE records (record_id VARCHAR, alert_key VARCHAR, processed_at TIMESTAMPTZ, alert_at TIMESTAMPTZ, severity VARCHAR,"
        " user_key VARCHAR, display_name VARCHAR, department VARCHAR, departing BOOLEAN, policy VARCHAR, rule VARCHAR, policies JSON,"
        " workload VARCHAR, band VARCHAR, score DOUBLE, sensitive JSON, lifecycle VARCHAR, exception JSON)"
    )
    con.execute("SET TimeZone = 'UTC'")
    return con


def load(con: Any, files: list[LakeFile], progress: ReadProgress) -> None:
    """Read the files into `records`: every line or row that is a record (one with a `record_id`)."""
    progress.start(len(files), sum(f.size for f in files))
    for group in chunks(files):
        jsonl = [str(f.path) for f in group if not f.is_parquet]
        parquet = [str(f.path) for f in group if f.is_parquet]
        if jsonl:
            con.execute(
                f"INSERT INTO records SELECT * FROM (SELECT {_COLUMNS} FROM (SELECT {_EXTRACT} FROM (SELECT json AS j FROM read_json_objects(?, format = 'newline_delimited', ignore_errors = true)))) WHERE record_id IS NOT NULL",
                [jsonl],
            )
        if parquet:
            con.execute(f"INSERT INTO records SELECT * FROM (SELECT {_COLUMNS} FROM (SELECT {_EXTRACT} FROM (SELECT json(record_json) AS j FROM read_parquet(?, union_by_name = true)))) WHERE record_id IS NOT NULL",
                [parquet],
            )
        progress.advance(sum(f.size for f in group), files=len(group))
    progress.finish()


def _alerts_view(con: Any, since: date | None) -> None:
    """`alerts`: the latest revision of each alert, from `since` (a UTC day) on."""
    since_filter = f"CAST(alert_at AS DATE) >= DATE '{since.isoformat()}'" if since is not None else "true"  # a date: no quoting needed
    con.execute(
        f"""
        CREATE OR REPLACE TEMP VIEW alerts AS
        SELECT *, CAST(alert_at AS DATE) AS day,
               lifecycle IN ('overridden', 'override')
                 OR coalesce(TRY_CAST(exception->>'$.override' AS BOOLEAN), TRY_CAST(exception->>'$.overridden' AS BOOLEAN), false)
                 OR (lower(exception->>'$.kind') IN ('override', 'overridden')) AS overridden,
               lifecycle IN ('reported_false_positive', 'false_positive')
                 OR coalesce(TRY_CAST(exception->>'$.false_positive' AS BOOLEAN), false)
                 OR (lower(exception->>'$.kind') IN ('false_positive', 'reported_false_positive')) AS false_positive
        FROM records
        WHERE {since_filter}
        QUALIFY row_number() OVER (PARTITION BY alert_key ORDER BY processed_at DESC NULLS LAST, record_id DESC) = 1
        """
    )


def summarise(con: Any, *, since: date | None = None, files: int = 0, top: int = 10) -> Summary:
    """Every aggregate of the report, from the loaded `records`."""
    _alerts_view(con, since)
    rows = lambda sql, *params: [tuple(row) for row in con.execute(sql, list(params)).fetchall()]  # noqa: E731
    one = lambda sql: con.execute(sql).fetchone()  # noqa: E731
    summary = Summary(files=files, since=since)
    summary.records = int(one("SELECT count(*) FROM records")[0])
    summary.alerts, summary.users, summary.first_day, summary.last_day = one("SELECT count(*), count(DISTINCT user_key), min(day), max(day) FROM alerts")
    summary.has_lifecycle = bool(one("SELECT count(*) FROM records WHERE lifecycle IS NOT NULL OR exception IS NOT NULL")[0])

    per_day: dict[date, dict[str, int]] = {}
    for day, severity, count in rows("SELECT day, coalesce(severity, 'unknown'), count(*) FROM alerts WHERE day IS NOT NULL GROUP BY ALL ORDER BY 1"):
        per_day.setdefault(day, {})[severity] = int(count)
    summary.per_day = sorted(per_day.items())

    sections = summary.sections
    sections["users"] = Section(
        "Top users",
        ["user", "name", "department", "departing", "alerts", "high severity", "max score"],
        rows(
            """SELECT user_key, arg_max(display_name, processed_at), arg_max(department, processed_at), bool_or(departing),
                      count(*) AS n, count(*) FILTER (severity = 'high'), max(score)
               FROM alerts WHERE user_key IS NOT NULL GROUP BY user_key ORDER BY n DESC, user_key LIMIT ?""",
            top,
        ),
    )
    sections["policies"] = Section(
        "Top policies",
        ["policy", "alerts", "high severity", "users"],
        rows(
            """SELECT coalesce(policy, '(none)'), count(*) AS n, count(*) FILTER (severity = 'high'), count(DISTINCT user_key)
               FROM alerts GROUP BY 1 ORDER BY n DESC, 1 LIMIT ?""",
            top,
        ),
    )
    # Every rule of every policy of an alert (alert.policies[].rules[]), else its one rule_name.
    sections["rules"] = Section(
        "Top rules",
        ["rule", "policy", "alerts"],
        rows(
            """WITH matched AS (
                   SELECT coalesce(r->>'$.name', r->>'$.rule_id') AS rule, coalesce(p->>'$.name', policy) AS policy
                   FROM alerts, unnest(CAST(policies AS JSON[])) AS t(p), unnest(CAST(coalesce(p->'$.rules', '[]') AS JSON[])) AS u(r)
                   WHERE policies IS NOT NULL
                   UNION ALL SELECT rule, policy FROM alerts WHERE policies IS NULL OR json_array_length(policies) = 0)
               SELECT coalesce(rule, '(none)'), coalesce(policy, '(none)'), count(*) AS n FROM matched GROUP BY 1, 2 ORDER BY n DESC, 1 LIMIT ?""",
            top,
        ),
    )
    sections["sensitive"] = Section(
        "Sensitive information types",
        ["type", "alerts", "instances", "avg confidence", "max confidence", "high-confidence alerts"],
        rows(
            """WITH types AS (
                   SELECT coalesce(s->>'$.name', s->>'$.type_id', '(unnamed)') AS name, TRY_CAST(s->>'$.count' AS BIGINT) AS instances,
                          TRY_CAST(s->>'$.confidence' AS DOUBLE) AS confidence
                   FROM alerts, unnest(CAST(sensitive AS JSON[])) AS t(s) WHERE sensitive IS NOT NULL)
               SELECT name, count(*) AS n, coalesce(sum(instances), 0), round(avg(confidence)), max(confidence), count(*) FILTER (confidence >= 85)
               FROM types GROUP BY name ORDER BY n DESC, name LIMIT ?""",
            top,
        ),
        note="high confidence: 85 or more (Microsoft's high confidence level)",
    )
    bands = rows("SELECT coalesce(band, '(not triaged)'), count(*) AS n, round(avg(score)) FROM alerts GROUP BY 1")
    order = {name: index for index, name in enumerate(BANDS)}
    sections["bands"] = Section("Triage bands", ["band", "alerts", "avg score"], sorted(bands, key=lambda row: (order.get(row[0], len(order)), row[0])))
    sections["workloads"] = Section(
        "Workloads", ["workload", "alerts", "users"], rows("SELECT coalesce(workload, '(none)'), count(*) AS n, count(DISTINCT user_key) FROM alerts GROUP BY 1 ORDER BY n DESC, 1")
    )
    if summary.has_lifecycle:
        sections["lifecycle"] = Section(
            "Overrides and false-positive reports",
            ["policy", "alerts", "overridden", "false positive", "undone"],
            rows(
                """SELECT coalesce(policy, '(none)'), count(*), count(*) FILTER (overridden), count(*) FILTER (false_positive),
                          count(*) FILTER (lifecycle = 'undone') AS undone
                   FROM alerts GROUP BY 1 HAVING count(*) FILTER (overridden OR false_positive OR lifecycle = 'undone') > 0
                   ORDER BY count(*) FILTER (overridden OR false_positive) DESC, 1 LIMIT ?""",
                top,
            ),
            note="the users' justifications are never shown",
        )
        sections["lifecycle_states"] = Section(
            "Lifecycle states", ["state", "alerts"], rows("SELECT coalesce(lifecycle, 'matched'), count(*) AS n FROM alerts GROUP BY 1 ORDER BY n DESC, 1")
        )
    return summary
