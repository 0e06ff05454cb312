"""The enrichment summary a responder reads: one renderer for ServiceNow and Jira descriptions and
for the comments written on Defender XDR and Sentinel incidents.

Guarantees:
- it reads only the record *as projected for the sink* (`record.to_dict()` after minimisation): a
  field outside a sink's allow-list is absent from its summary, and a section with nothing to show
  is left out;
- it never renders a matched value: the record has none (pipeline.models), and of the sensitive
  types only the name, count and confidence are shown;
- sections come in the configured order, `heading` and `extra_lines` are templates over the record
  (`{alert.title}`, `{enrichments.triage.band}`; an absent field renders as "").

Sections: `triage` (band, score, thresholds and every reason with its points and evidence), `user`
(department, job, employee type, manager, departure date), `prior` (counts for 7/30/90 days, same
policy, the last one), `sensitive` (types with counts and confidence), `telemetry` (highlights),
`alert` (policy, workload, files, external sharing), `links` (the Defender alert and incident).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field

from pipeline.config import StrictModel
from pipeline.deliver.minimise import get_path

Section = Literal["triage", "user", "prior", "sensitive", "telemetry", "alert", "links"]
DEFAULT_SECTIONS: list[Section] = ["triage", "user", "prior", "sensitive", "telemetry", "alert", "links"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")


class SummarySettings(StrictModel):
    """How a sink renders the enrichment summary (`[sinks.settings.summary]`)."""

    heading: str = Field("Purview DLP alert ({alert.severity}): {alert.title}", description="first line (template)")
    sections: list[Section] = Field(default_factory=lambda: list(DEFAULT_SECTIONS), description="sections in this order")
    extra_lines: list[str] = Field(default_factory=list, description="templates appended after the sections, e.g. \"Runbook: https://…\"")
    max_reasons: int = Field(10, ge=0, le=50)
    max_types: int = Field(10, ge=0, le=100, description="sensitive types listed (the rest are counted)")
    max_files: int = Field(10, ge=0, le=100)
    max_rules: int = Field(10, ge=0, le=100, description="DLP rules listed (the rest are counted)")
    max_telemetry_fields: int = Field(8, ge=0, le=100, description="telemetry fields shown when no triage reason names them")


def fill(template: str, document: dict[str, Any], *, named: dict[str, str] | None = None, text: Callable[[Any], str] | None = None) -> str:
    """A template with `{dotted.path}` placeholders filled from the record; absent → "". `named`
    placeholders (e.g. `{summary}`) take their given text; `text` turns a found value into text
    (default: booleans as yes/no, whole floats without ".0")."""
    as_text = text or _text

    def value(match: re.Match[str]) -> str:
        if named and match.group(1) in named:
            return named[match.group(1)]
        found = get_path(document, match.group(1))
        if found is None:
            return ""
        if isinstance(found, list):
            return ", ".join(str(item) for item in found if item is not None)
        return as_text(found)

    return _PLACEHOLDER.sub(value, template).strip()


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _date(value: Any) -> str | None:
    """The date part of an ISO timestamp ("2025-03-28T17:00:00+01:00" → "2025-03-28")."""
    return value[:10] if isinstance(value, str) and len(value) >= 10 else (str(value) if value else None)


def _more(shown: int, total: int) -> str:
    return f" (+{total - shown} more)" if total > shown else ""


def render_lines(document: dict[str, Any], *, record_id: str, settings: SummarySettings | None = None) -> list[str]:
    """The summary as lines (the heading first unless it renders empty, the pipeline record id last)."""
    heading, body = render_parts(document, record_id=record_id, settings=settings)
    return [heading, *body] if heading else body


def render_parts(document: dict[str, Any], *, record_id: str, settings: SummarySettings | None = None) -> tuple[str, list[str]]:
    """The heading ("" when it renders to nothing) and the body lines, for formats with a heading of their own (Jira ADF)."""
    s = settings or SummarySettings()
    lines: list[str] = []
    heading = fill(s.heading, document)
    if not heading.strip(" :()"):
        heading = ""
    for section in s.sections:
        lines.extend(_SECTIONS[section](document, s))
    lines.extend(text for template in s.extra_lines if (text := fill(template, document)))
    lines.append(f"Pipeline record: {record_id}")
    return heading, lines


def render_text(document: dict[str, Any], *, record_id: str, settings: SummarySettings | None = None) -> str:
    return "\n".join(render_lines(document, record_id=record_id, settings=settings))


def _triage(document: dict[str, Any], s: SummarySettings) -> list[str]:
    triage = get_path(document, "enrichments.triage")
    if not isinstance(triage, dict) or triage.get("score") is None:
        return []
    band = triage.get("band")
    thresholds = triage.get("thresholds") or {}
    limits = ", ".join(f"{name} from {value}" for name, value in sorted(thresholds.items(), key=lambda kv: -kv[1]) if isinstance(value, int | float))
    head = f"Triage: {band or 'unbanded'} (score {_text(triage['score'])}" + (f"; {limits}" if limits else "") + ")"
    lines = [head]
    reasons = [r for r in triage.get("reasons") or [] if r]
    for reason in reasons[: s.max_reasons]:
        if isinstance(reason, dict):
            evidence = reason.get("evidence") or {}
            shown = "; ".join(f"{k}={_text(v)}" for k, v in evidence.items()) if isinstance(evidence, dict) else ""
            detail = reason.get("detail") or ""
            lines.append(f"  +{_text(reason.get('points', 0))} {reason.get('code')}: {detail}" + (f" [{shown}]" if shown else ""))
        else:
            lines.append(f"  {reason}")
    if len(reasons) > s.max_reasons:
        lines.append(f"  (+{len(reasons) - s.max_reasons} more reasons)")
    missing = triage.get("missing_inputs") or []
    if missing:
        lines.append("  scored without: " + ", ".join(missing))
    return lines


def _user(document: dict[str, Any], s: SummarySettings) -> list[str]:
    user = get_path(document, "alert.user") or {}
    context = get_path(document, "enrichments.user_context") or {}
    name = user.get("upn") or user.get("display_name") or context.get("display_name")
    if not name and not context:
        return []
    display = context.get("display_name") or user.get("display_name")
    head = f"User: {name or 'unknown'}" + (f" ({display})" if display and display != name else "")
    details = [f"{label}: {value}" for label, value in (
        ("department", context.get("department")),
        ("job", context.get("job_title")),
        ("employee type", context.get("employee_type")),
        ("company", context.get("company_name")),
    ) if value]
    lines = [head + (" — " + ", ".join(details) if details else "")]
    manager = context.get("manager") or {}
    if isinstance(manager, dict) and (manager.get("display_name") or manager.get("upn") or manager.get("mail")):
        who = manager.get("display_name") or manager.get("upn") or manager.get("mail")
        contact = manager.get("mail") or manager.get("upn")
        lines.append(f"  manager: {who}" + (f" <{contact}>" if contact and contact != who else ""))
    leaves = _date(context.get("last_working_date") or context.get("leave_date"))
    days = context.get("days_until_departure")
    if context.get("departed"):
        lines.append(f"  departed: {leaves or 'date unknown'}" + (f" ({-days} day(s) before the alert)" if isinstance(days, int) else ""))
    elif context.get("departing") or leaves:
        lines.append(f"  departure date: {leaves or 'unknown'}" + (f" (in {days} day(s))" if isinstance(days, int) else "")
                     + (f"; resigned {_date(context.get('resignation_date'))}" if context.get("resignation_date") else ""))
    if context.get("account_enabled") is False:
        lines.append("  account disabled")
    return lines


def _prior(document: dict[str, Any], s: SummarySettings) -> list[str]:
    prior = get_path(document, "enrichments.prior_incidents")
    if not isinstance(prior, dict):
        return []
    line = (f"Prior incidents: {prior.get('last_7_days', 0)} in 7 days, {prior.get('last_30_days', 0)} in 30 days, "
            f"{prior.get('last_90_days', 0)} in 90 days; same policy in 90 days: {prior.get('same_policy_90_days', 0)}")
    recent = [r for r in prior.get("recent") or [] if isinstance(r, dict)]
    if recent:
        last = recent[0]
        parts = [p for p in (_date(last.get("at")), last.get("policy"), last.get("severity")) if p]
        line += f"; last: {' '.join(parts[:1])}" + (f" ({', '.join(parts[1:])})" if len(parts) > 1 else "")
    elif prior.get("last_alert_at"):
        line += f"; last: {_date(prior['last_alert_at'])}"
    return [line]


def _sensitive(document: dict[str, Any], s: SummarySettings) -> list[str]:
    enriched = get_path(document, "enrichments.sensitive_info.types")
    items = enriched if isinstance(enriched, list) else get_path(document, "alert.sensitive_info") or []
    entries = []
    for item in items:
        if not isinstance(item, dict) or not (item.get("name") or item.get("type_id")):
            continue
        text = str(item.get("name") or item.get("type_id"))
        if item.get("count") is not None:
            text += f" x{item['count']}"
        if item.get("confidence") is not None:
            text += f" (confidence {item['confidence']})"
        entries.append(text)
    if not entries:
        return []
    return ["Sensitive types: " + ", ".join(entries[: s.max_types]) + _more(min(len(entries), s.max_types), len(entries))]


def _telemetry(document: dict[str, Any], s: SummarySettings) -> list[str]:
    telemetry = get_path(document, "enrichments.telemetry")
    if not isinstance(telemetry, dict):
        return []
    reasons = [r for r in get_path(document, "enrichments.triage.reasons") or [] if isinstance(r, dict) and r.get("source") == "telemetry"]
    if reasons:  # the values triage weighed are the highlights
        return ["Telemetry: " + "; ".join(f"{r.get('detail')}" for r in reasons)]
    shown: list[str] = []
    for name, result in sorted((telemetry.get("sources") or {}).items()):
        if not isinstance(result, dict) or not result.get("found"):
            continue
        fields = result.get("fields") or {}
        pairs = [f"{k}={_text(v)}" for k, v in list(fields.items())[: s.max_telemetry_fields] if v not in (None, "")]
        shown.append(f"{name} ({', '.join(pairs)})" if pairs else name)
    errors = sorted((telemetry.get("errors") or {}).keys())
    if not shown and not errors:
        return []
    return ["Telemetry: " + ("; ".join(shown) if shown else "nothing known") + (f"; unavailable: {', '.join(errors)}" if errors else "")]


def _alert(document: dict[str, Any], s: SummarySettings) -> list[str]:
    alert = document.get("alert") or {}
    lines = []
    policy = " / ".join(p for p in (alert.get("policy_name"), alert.get("rule_name")) if p)
    if policy:
        lines.append(f"Policy: {policy}")
    for label, key in (("Alert id", "alert_id"), ("Severity", "severity"), ("Workload", "workload")):
        if alert.get(key):
            lines.append(f"{label}: {alert[key]}")
    files = [name for f in alert.get("files") or [] if isinstance(f, dict) and isinstance(name := f.get("name"), str) and name]
    if files:
        lines.append("Files: " + ", ".join(files[: s.max_files]) + _more(min(len(files), s.max_files), len(files)))
    if alert.get("shared_externally") is not None:
        lines.append(f"Shared externally: {_text(alert['shared_externally'])}")
    lifecycle = alert.get("lifecycle") or {}
    if isinstance(lifecycle, dict) and lifecycle.get("state"):
        lines.append("DLP lifecycle: " + str(lifecycle["state"]).replace("_", " "))
    exception = alert.get("exception")
    if isinstance(exception, dict) and exception.get("reason"):
        lines.append(f"Exception reason: {exception['reason']}")
    rules = [
        f"{rule.get('name') or rule.get('rule_id')}" + (f" ({rule['severity']})" if rule.get("severity") not in (None, "unknown") else "")
        for policy in alert.get("policies") or []
        if isinstance(policy, dict)
        for rule in policy.get("rules") or []
        if isinstance(rule, dict) and (rule.get("name") or rule.get("rule_id"))
    ]
    if rules:
        lines.append("Rules matched: " + ", ".join(rules[: s.max_rules]) + _more(min(len(rules), s.max_rules), len(rules)))
    return lines


def _links(document: dict[str, Any], s: SummarySettings) -> list[str]:
    alert = document.get("alert") or {}
    lines = []
    if alert.get("alert_url"):
        lines.append(f"Defender alert: {alert['alert_url']}")
    if alert.get("incident_url") or alert.get("incident_id"):
        lines.append(f"Defender incident: {alert.get('incident_url') or alert.get('incident_id')}")
    return lines


_SECTIONS = {
    "triage": _triage,
    "user": _user,
    "prior": _prior,
    "sensitive": _sensitive,
    "telemetry": _telemetry,
    "alert": _alert,
    "links": _links,
}
