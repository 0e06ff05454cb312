"""Helpers shared by the decoders: value normalisation and removal of matched sensitive content."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

import orjson

from pipeline.ingest.limits import MAX_EMBEDDED_JSON_LEVELS, has_unicode_escape

# Keys that hold matched values or the text around a match, in any of the input formats.
# Compared case-insensitively; the whole value under such a key is dropped.
MATCHED_CONTENT_KEYS = frozenset(
    {
        "sensitiveinformationdetections",  # Management Activity: {DetectedValues, ResultsTruncated}
        "sensitiveinformationdetectionsinfo",  # Endpoint DLP: {DetectedValues}
        "detectedvalues",  # anywhere: [{Name: match, Value: context}]
        "matchedvalues",
        "evidencetext",
    }
)

# Free text typed by a user or copied from the message that DLP inspected: it can repeat the matched
# values (an override justification quoting the card number, an email subject holding it). No decoder
# reads these keys; they are removed like matched content, so that rejected records and dead-lettered
# bodies do not carry them either. See docs/security.md.
FREE_TEXT_KEYS = frozenset({"justification", "subject"})

# Every key `scrub` removes, compared case-insensitively.
REMOVED_KEYS = MATCHED_CONTENT_KEYS | FREE_TEXT_KEYS

DLP_SERVICE = "data loss prevention"

_SEVERITIES = {
    "informational": "informational",
    "information": "informational",
    "info": "informational",
    "low": "low",
    "medium": "medium",
    "moderate": "medium",
    "high": "high",
    "critical": "high",
}

_RULE_IN_TITLE = re.compile(r"DLP policy \(([^)]+)\)")
_WORKLOADS = (
    ("sharepoint", "SharePoint"),
    ("onedrive", "OneDrive"),
    ("exchange", "Exchange"),
    ("outlook", "Exchange"),
    ("teams", "Teams"),
    ("endpoint", "Endpoint"),
    ("device", "Endpoint"),
    ("power bi", "PowerBI"),
    ("powerbi", "PowerBI"),
)


def scrub(value: Any) -> Any:
    """Return `value` with every removed key (`REMOVED_KEYS`) dropped, at any depth. Does not mutate.

    JSON held in a string (AdditionalFields, Entities, ExtendedProperties, RawEventData) is scrubbed
    too and re-serialised when something was removed; a string that names a removed key but cannot
    be parsed (or is embedded too deep) is replaced by a placeholder. Iterative: no input can raise
    RecursionError.
    """
    return _scrub(value, 0)[0]


# Containers nested deeper than this are replaced by TRUNCATED_TEXT in scrubbed copies, so that a
# copy can always be serialised (orjson refuses deeper than 254 levels). Records that pass the
# nesting limit (at most 128, pipeline/ingest/limits.py) are never that deep.
SCRUB_MAX_DEPTH = 200
TRUNCATED_TEXT = "[truncated: nested too deep]"


def mentions_removed_key(text: str | bytes, *, has_escape: bool | None = None) -> bool:
    """True when `text` may name a removed key: it holds one (any casing) that is not the tail of a
    longer word (`EmailSubject` does not name `Subject`; `"Subject"`, `{Subject:` and `\\"subject\\"`
    do), or a \\u escape at any level of embedding (which could spell one; `limits.has_unicode_escape`).
    `has_escape`: whether valid JSON `text` holds a \\u escape, when the caller already knows."""
    if has_escape or (has_escape is None and has_unicode_escape(text)):
        return True
    lowered: Any = text.lower()
    for key in _KEYS_BYTES if isinstance(lowered, bytes) else _KEYS_TEXT:  # one loop, no call per key: this runs on every DLP row
        at = lowered.find(key)
        while at != -1:
            if at == 0 or not lowered[at - 1 : at].isalnum():
                return True
            at = lowered.find(key, at + 1)
    return False


# The keys searched for: a key that starts with another is found through the shorter one (same
# start, same character before it), so only the shortest of such keys are searched.
_KEYS_TEXT = tuple(sorted(key for key in REMOVED_KEYS if not any(key != other and key.startswith(other) for other in REMOVED_KEYS)))
_KEYS_BYTES = tuple(key.encode() for key in _KEYS_TEXT)


WITHHELD_TEXT = "[withheld: unparseable text naming matched content]"


def _scrub(value: Any, level: int) -> tuple[Any, bool]:
    if isinstance(value, str):
        return _scrub_string(value, level)
    if not isinstance(value, (dict, list)):
        return value, False
    changed = False
    result: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, result, 1)]
    while stack:
        source, target, depth = stack.pop()
        is_dict = type(source) is dict
        for key, item in (source.items() if is_dict else enumerate(source)):
            if is_dict and type(key) is str and key.lower() in REMOVED_KEYS:
                changed = True
                continue
            kind = type(item)
            if kind is dict or kind is list:
                if depth >= SCRUB_MAX_DEPTH:
                    item, changed = TRUNCATED_TEXT, True
                else:
                    copy: Any = {} if kind is dict else []
                    stack.append((item, copy, depth + 1))
                    item = copy
            elif kind is str and item[:1] in _JSON_HEADS:
                item, string_changed = _scrub_string(item, level)
                changed = changed or string_changed
            if is_dict:
                target[key] = item
            else:
                target.append(item)
    return result, changed


_JSON_HEADS = ("{", "[", " ", "\t", "\n", "\r")


def _scrub_string(value: str, level: int) -> tuple[str, bool]:
    head = value[:64].lstrip()[:1]
    if head not in ("{", "[") or not mentions_removed_key(value):
        return value, False
    if level < MAX_EMBEDDED_JSON_LEVELS:
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, (dict, list)):
            scrubbed, changed = _scrub(parsed, level + 1)
            return (orjson.dumps(scrubbed).decode() if changed else value), changed
    return WITHHELD_TEXT, True


def as_list(value: Any) -> list[Any]:
    """`value` when it is a list, else an empty list (input fields of the wrong type are ignored)."""
    return value if isinstance(value, list) else []


def is_dlp_service(*values: Any) -> bool:
    """True when any value names the DLP service ("Microsoft Data Loss Prevention" and variants)."""
    for value in values:
        if isinstance(value, str) and DLP_SERVICE in value.lower():
            return True
    return False


def severity(value: Any) -> str:
    if isinstance(value, str):
        return _SEVERITIES.get(value.strip().lower(), "unknown")
    return "unknown"


def text(value: Any) -> str | None:
    """A non-empty stripped string, or None."""
    if type(value) is str:
        return value.strip() or None
    if value is None:
        return None
    value = value.strip() if isinstance(value, str) else str(value).strip()
    return value or None


def integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def json_value(value: Any) -> Any:
    """Parse a JSON-in-a-string column (AdditionalFields, Entities, …); pass dicts and lists through."""
    if isinstance(value, (dict, list)):
        return value
    if isinstance(value, (str, bytes)) and value:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return None
    return None


def json_object(value: Any) -> dict[str, Any]:
    parsed = json_value(value)
    return parsed if isinstance(parsed, dict) else {}


def json_list(value: Any) -> list[Any]:
    parsed = json_value(value)
    return parsed if isinstance(parsed, list) else []


def utc_timestamp(value: Any) -> str | None:
    """An ISO-8601 string with a zone; the Management Activity API omits the `Z` of UTC times."""
    value = text(value)
    if value is None:
        return None
    tail = value[10:]
    if "T" in tail and "Z" not in tail and "+" not in tail and "-" not in tail:
        value += "Z"
    return value


# The rows of one split alert repeat its title (and often its application): the two functions of a
# text below are kept for the last 1,024 texts, so each is worked out once per alert, not per row.
@lru_cache(maxsize=1024)
def _rule_in(title: str) -> str | None:
    match = _RULE_IN_TITLE.search(title)
    return match.group(1).strip() if match else None


@lru_cache(maxsize=1024)
def _workload_in(text: str) -> str | None:
    lowered = text.lower()
    for needle, name in _WORKLOADS:
        if needle in lowered:
            return name
    return None


def rule_from_title(title: str | None) -> str | None:
    if not title:
        return None
    return _rule_in(title)


def workload_from_text(*values: Any) -> str | None:
    """Best-effort workload name (SharePoint, OneDrive, Exchange, Teams, Endpoint) from free text."""
    for value in values:
        if isinstance(value, str):
            found = _workload_in(value)
            if found is not None:
                return found
    return None


def url_decoded(value: Any) -> str | None:
    value = text(value)
    return unquote(value) if value and "%" in value else value


def upn(value: Any) -> str | None:
    """A user principal name (something@domain), or None."""
    value = text(value)
    return value if value and "@" in value else None


_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def guid(value: Any) -> str | None:
    value = text(value)
    return value if value and _GUID.match(value) else None


def add_sensitive_info(target: list[dict[str, Any]], name: Any, type_id: Any, count: Any, confidence: Any) -> None:
    """Append one sensitive-type entry, merging with an entry of the same type (max of count/confidence)."""
    entry = {"name": text(name), "type_id": text(type_id), "count": integer(count), "confidence": integer(confidence)}
    if entry["name"] is None and entry["type_id"] is None:
        return
    for existing in target:
        same = (entry["type_id"] and existing["type_id"] == entry["type_id"]) or (
            not entry["type_id"] and existing["name"] == entry["name"]
        )
        if same:
            for key in ("count", "confidence"):
                if entry[key] is not None and (existing[key] is None or entry[key] > existing[key]):
                    existing[key] = entry[key]
            existing["name"] = existing["name"] or entry["name"]
            return
    target.append(entry)


_NAME_WITH_COUNT = re.compile(r"^(.*?)\s*\((\d+)\)$")


def sensitive_types_from_text(value: Any) -> list[dict[str, Any]]:
    """Parse "Credit Card Number (12); U.S. Social Security Number (SSN) (3)" or a list of names."""
    items: list[Any]
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = [part for part in re.split(r"[;\n]", value)]
    else:
        return []
    found: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, dict):
            add_sensitive_info(
                found,
                item.get("Name") or item.get("name"),
                item.get("Id") or item.get("id") or item.get("TypeId"),
                item.get("Count") or item.get("count"),
                item.get("Confidence") or item.get("confidence"),
            )
            continue
        name = text(item)
        if not name:
            continue
        match = _NAME_WITH_COUNT.match(name)
        if match:
            add_sensitive_info(found, match.group(1), None, match.group(2), None)
        else:
            add_sensitive_info(found, name, None, None, None)
    return found


def named_policies(policy_name: str | None, rule_name: str | None) -> list[dict[str, Any]]:
    """The `policies` of a format that names one policy and one rule and nothing more about them
    (Graph, Sentinel, Streaming alerts): ids, mode and actions unknown, the rule's own severity too
    (the alert's severity is the alert rule's, not necessarily the DLP rule's). Empty without names."""
    if not policy_name and not rule_name:
        return []
    rules = [{"name": rule_name, "severity": "unknown"}] if rule_name else []
    return [{"name": policy_name, "rules": rules}]
