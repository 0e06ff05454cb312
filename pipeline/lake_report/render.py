"""The report as one self-contained HTML page: inline CSS and SVG, no script, no font, image or style
fetched from anywhere (a Content-Security-Policy in the page forbids it), every value HTML-escaped."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from pipeline.lake_report.query import SEVERITIES, Section, Summary

COLOURS = {"high": "#c0392b", "critical": "#7b1fa2", "medium": "#e67e22", "low": "#f1c40f", "informational": "#3498db", "unknown": "#95a5a6"}
BAR = "#2e86c1"
TABLE_DAYS = 31  # days listed beside the per-day chart (the most recent)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px;color:#1c2833;background:#fdfefe}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d5d8dc;padding-bottom:4px}
.meta{color:#566573;font-size:13px}.cards{display:flex;gap:12px;margin:16px 0;flex-wrap:wrap}
.card{border:1px solid #d5d8dc;border-radius:6px;padding:8px 14px;min-width:110px}.card b{display:block;font-size:22px}
.pair{display:grid;grid-template-columns:470px minmax(0,1fr);gap:20px;align-items:start}
table{border-collapse:collapse;font-size:13px;width:100%}th,td{border-bottom:1px solid #eaecee;padding:3px 6px;text-align:left}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f6f7}.note{color:#566573;font-size:12px}
.empty{color:#566573;font-style:italic}svg text{font-size:11px;fill:#1c2833}.legend span{display:inline-block;margin-right:10px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
"""


def render(summary: Summary, *, sources: list[str], generated_at: datetime | None = None) -> str:
    when = (generated_at or datetime.now(UTC)).strftime("%Y-%m-%d %H:%M UTC")
    span = f"{summary.first_day} to {summary.last_day}" if summary.first_day else "no alerts"
    since = f", alerts from {summary.since} on" if summary.since else ""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">",
        f"<title>DLP posture report, {escape(span)}</title><style>{_CSS}</style></head><body>",
        "<h1>DLP posture report</h1>",
        f"<div class='meta'>{escape(span)}{escape(since)} · generated {escape(when)} · lake: {escape('; '.join(sources))}</div>",
        "<div class='cards'>",
        _card("alerts", summary.alerts),
        _card("users", summary.users),
        _card("records read", summary.records),
        _card("files read", summary.files),
        "</div>",
        "<p class='note'>Alerts count the latest revision of each alert; user identifiers appear as the lake stores them (pseudonyms stay pseudonyms).</p>",
    ]
    parts.append(_per_day(summary))
    sections = summary.sections
    parts.append(_ranked(sections["users"], label=0, value=4))
    parts.append(_ranked(sections["policies"], label=0, value=1))
    parts.append(_ranked(sections["rules"], label=0, value=2))
    parts.append(_ranked(sections["sensitive"], label=0, value=1))
    parts.append(_ranked(sections["bands"], label=0, value=1, colour_by_label=True))
    parts.append(_ranked(sections["workloads"], label=0, value=1))
    if "lifecycle" in sections:
        parts.append(_ranked(sections["lifecycle"], label=0, value=2, second=3))
        parts.append(_ranked(sections["lifecycle_states"], label=0, value=1))
    else:
        parts.append("<h2>Overrides and false-positive reports</h2><p class='empty'>The records carry no lifecycle or exception fields: none to show.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _card(label: str, value: int) -> str:
    return f"<div class='card'><b>{value:,}</b>{escape(label)}</div>"


def _cell(value: Any) -> str:
    if value is None:
        return "<td></td>"
    if isinstance(value, bool):
        return f"<td>{'yes' if value else 'no'}</td>"
    if isinstance(value, int | float):
        number = int(value) if float(value).is_integer() else value
        return f"<td class='n'>{number:,}</td>"
    return f"<td>{escape(str(value))}</td>"


def _table(section: Section) -> str:
    if not section.rows:
        return "<p class='empty'>No data in the records.</p>"
    numeric = [all(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in section.rows if row[i] is not None) for i in range(len(section.columns))]
    head = "".join(f"<th class='{'n' if numeric[i] else ''}'>{escape(name)}</th>" for i, name in enumerate(section.columns))
    body = "".join("<tr>" + "".join(_cell(value) for value in row) + "</tr>" for row in section.rows)
    note = f"<p class='note'>{escape(section.note)}</p>" if section.note else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _ranked(section: Section, *, label: int, value: int, second: int | None = None, colour_by_label: bool = False) -> str:
    """A horizontal bar chart of one column (optionally a second, stacked), the table beside it."""
    chart = "<p class='empty'>No data in the records.</p>"
    if section.rows:
        width, row_height, label_width = 460, 22, 210
        height = row_height * len(section.rows) + 8
        largest = max(((row[value] or 0) + ((row[second] or 0) if second is not None else 0)) for row in section.rows) or 1
        scale = (width - label_width - 50) / largest
        bars = []
        for index, row in enumerate(section.rows):
            y = 4 + index * row_height
            text = str(row[label])
            shown = text if len(text) <= 32 else text[:31] + "…"
            first = row[value] or 0
            colour = COLOURS.get(str(row[label]), BAR) if colour_by_label else BAR
            bars.append(f"<text x='{label_width - 6}' y='{y + 15}' text-anchor='end'><title>{escape(text)}</title>{escape(shown)}</text>")
            bars.append(f"<rect x='{label_width}' y='{y + 3}' width='{first * scale:.1f}' height='{row_height - 6}' fill='{colour}'/>")
            end = label_width + first * scale
            if second is not None and row[second]:
                bars.append(f"<rect x='{end:.1f}' y='{y + 3}' width='{row[second] * scale:.1f}' height='{row_height - 6}' fill='#8e44ad'/>")
                end += row[second] * scale
            total = first + ((row[second] or 0) if second is not None else 0)
            bars.append(f"<text x='{end + 4:.1f}' y='{y + 15}'>{total:,}</text>")
        legend = ""
        if second is not None:
            legend = f"<div class='legend'><span><i style='background:{BAR}'></i>{escape(section.columns[value])}</span><span><i style='background:#8e44ad'></i>{escape(section.columns[second])}</span></div>"
        chart = f"<svg role='img' aria-label='{escape(section.title)}' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>{''.join(bars)}</svg>{legend}"
    return f"<h2>{escape(section.title)}</h2><div class='pair'><div>{chart}</div><div>{_table(section)}</div></div>"


def _per_day(summary: Summary) -> str:
    """Alerts per day, stacked by severity: columns on a time axis, the table beside them."""
    title = "<h2>Alerts per day by severity</h2>"
    if not summary.per_day:
        return title + "<p class='empty'>No alerts in the records.</p>"
    seen = {severity for _, counts in summary.per_day for severity in counts}
    severities = [s for s in SEVERITIES if s in seen] + sorted(seen - set(SEVERITIES))
    width, height, bottom, left = 460, 220, 40, 34
    days = summary.per_day
    largest = max(sum(counts.values()) for _, counts in days) or 1
    step = (width - left - 10) / len(days)
    bar = max(min(step * 0.7, 40), 1.5)
    scale = (height - bottom - 10) / largest
    shapes = [
        f"<line x1='{left}' y1='{height - bottom}' x2='{width - 5}' y2='{height - bottom}' stroke='#85929e'/>",
        f"<text x='{left - 4}' y='{height - bottom - largest * scale + 4:.1f}' text-anchor='end'>{largest}</text>",
        f"<text x='{left - 4}' y='{height - bottom + 4}' text-anchor='end'>0</text>",
    ]
    label_every = max(1, len(days) // 8)
    for index, (day, counts) in enumerate(days):
        x = left + index * step + (step - bar) / 2
        y = float(height - bottom)
        for severity in severities:
            count = counts.get(severity, 0)
            if count:
                h = count * scale
                y -= h
                shapes.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{bar:.1f}' height='{h:.1f}' fill='{COLOURS.get(severity, COLOURS['unknown'])}'><title>{day} {escape(severity)}: {count}</title></rect>")
        if index % label_every == 0:
            shapes.append(f"<text x='{x + bar / 2:.1f}' y='{height - bottom + 16}' text-anchor='middle'>{day:%m-%d}</text>")
    legend = "".join(f"<span><i style='background:{COLOURS.get(s, COLOURS['unknown'])}'></i>{escape(s)}</span>" for s in severities)
    chart = f"<svg role='img' aria-label='alerts per day' width='{width}' height='{height}' viewBox='0 0 {width} {height}'>{''.join(shapes)}</svg><div class='legend'>{legend}</div>"
    shown = days[-TABLE_DAYS:]
    note = f"the last {TABLE_DAYS} of {len(days)} days with alerts; the chart shows them all" if len(days) > TABLE_DAYS else ""
    table = Section("", ["day", *severities, "total"], [(str(day), *(counts.get(s, 0) for s in severities), sum(counts.values())) for day, counts in shown], note=note)
    return f"{title}<div class='pair'><div>{chart}</div><div>{_table(table)}</div></div>"
