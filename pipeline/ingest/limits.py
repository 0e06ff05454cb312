"""Limits on hostile or broken input, checked at decode before any decoder looks at a record.

Each violation has its own dead-letter reason code:

| limit                      | reason               | what is dead-lettered                                   |
|----------------------------|----------------------|---------------------------------------------------------|
| `max_body_bytes`           | `body_too_large`     | the whole message; the body is never parsed             |
| `max_records_per_message`  | `too_many_records`   | the whole message (one entry, not one per record)       |
| `max_nesting_depth`        | `too_deep`           | the offending record only                               |
| `max_string_length`        | `string_too_long`    | the offending record only                               |
| `max_evidence_per_alert`   | `too_many_evidence`  | the offending record only; for split alerts, the parts  |
|                            |                      | beyond the limit (state store `add_parts`, runner)      |

Envelope keys outside the records (`@odata.context`, …) are never read by a decoder and are not
checked; a record is checked from its own root.

Depth counts containers: `{}` is depth 1, `{"a": []}` depth 2. JSON held in a string (AdditionalFields,
Entities, ExtendedProperties, RawEventData) is walked too, its depth added to the string's own, so a
decoder that parses it later never meets a structure deeper than the limit. Every walk here is
iterative: no input can raise RecursionError.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import DecodeError

# Reason codes (dead-letter `reason`).
BODY_TOO_LARGE = "body_too_large"
TOO_MANY_RECORDS = "too_many_records"
TOO_MANY_EVIDENCE = "too_many_evidence"
STRING_TOO_LONG = "string_too_long"
TOO_DEEP = "too_deep"

# JSON held in strings is looked into at most this many levels (a string holding JSON holding a
# string holding JSON, ...). Real payloads use one level; deeper embeddings count as too deep.
MAX_EMBEDDED_JSON_LEVELS = 3


class Limits(BaseModel):
    """The `[limits]` table of the config. Defaults fit real Defender/Graph/Management API payloads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="bytes of one message body; 1 MiB is the Event Hubs Standard-tier event size"
    )
    max_records_per_message: int = Field(2000, ge=1, description="records (rows, alerts) in one message body")
    max_evidence_per_alert: int = Field(
        200, ge=1, description="evidence items of one alert (Graph evidence, Sentinel entities, SIT entries, split-alert parts)"
    )
    max_string_length: int = Field(64 * 1024, ge=256, description="characters of any one string (key or value) in a record")
    max_nesting_depth: int = Field(32, ge=4, le=128, description="nested objects/arrays in one record, counting embedded JSON")


DEFAULT_LIMITS = Limits()


class LimitExceeded(DecodeError):
    """One limit is exceeded; `reason` is the dead-letter reason code, `detail` never holds content."""


def check_body_size(body: bytes, limits: Limits) -> None:
    if len(body) > limits.max_body_bytes:
        raise LimitExceeded(BODY_TOO_LARGE, f"{len(body)} bytes, limit {limits.max_body_bytes}")


def check_record_count(count: int, limits: Limits) -> None:
    if count > limits.max_records_per_message:
        raise LimitExceeded(TOO_MANY_RECORDS, f"{count} records, limit {limits.max_records_per_message}")


def check_evidence_count(count: int, limits: Limits, what: str) -> None:
    if count > limits.max_evidence_per_alert:
        raise LimitExceeded(TOO_MANY_EVIDENCE, f"{count} {what}, limit {limits.max_evidence_per_alert}")


def looks_like_json(value: str) -> bool:
    """True for a string that may hold a JSON object or array (cheap test before parsing)."""
    head = value[:64].lstrip()
    return head[:1] in ("{", "[")


def embedded_json(value: str) -> Any | None:
    """The object or array a string holds, or None (not JSON, or a scalar)."""
    if not looks_like_json(value):
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, (dict, list)) else None


# A JSON \\u escape is a backslash, `u` and four hex digits, at every level of embedding: JSON held in
# a string shows its own escapes as `\\\\u0041` (the `u` and the digits stay literal unless they are
# escaped themselves, which is a \\u escape again). A Windows path's escaped backslash before a
# `u` (`C:\\\\users`) is not followed by four hex digits, so it is not taken for one.
_UNICODE_ESCAPE = re.compile(rb"\\u[0-9a-fA-F]{4}")
_UNICODE_ESCAPE_TEXT = re.compile(r"\\u[0-9a-fA-F]{4}")


def has_unicode_escape(text: bytes | str) -> bool:
    """True when JSON `text` may hold a \\u escape at any level of embedding (false positives only
    for a literal backslash, `u` and four hex digits, e.g. a path `C:\\\\u1234`)."""
    # The regular expression alone: its search skips to each backslash, which is faster than a
    # substring test for `\\u` on the backslash-dense text of escaped JSON (and never slower).
    if isinstance(text, str):
        return _UNICODE_ESCAPE_TEXT.search(text) is not None
    return _UNICODE_ESCAPE.search(text) is not None


def records_surely_within(body: bytes, limits: Limits, *, has_escape: bool | None = None, has_deep_embedding: bool | None = None) -> bool:
    """True when the bytes alone prove that no record of `body` breaks the depth or string limits, so
    `check_record` need not walk them (most real bodies: a few KB, a few dozen brackets). Sound because:
    - a string (or key), embedded JSON's included, has no more characters than the body has bytes;
    - every container on a path, embedded JSON's included, has its own literal `{` or `[` in the body,
      unless spelled with a \\u escape (then no proof);
    - JSON embedded two or more levels deep shows as a run of three backslashes (then no proof), so
      the embedding limit cannot be reached either.
    When this is False, nothing is wrong yet: `check_record` decides. `has_escape`, `has_deep_embedding`:
    whether the body holds a \\u escape or three backslashes in a row, when the caller already knows
    (`escape_or_deep_embedding` of a body that holds these bytes)."""
    return (
        len(body) <= limits.max_string_length
        and not (has_unicode_escape(body) if has_escape is None else has_escape)
        and body.count(b"{") + body.count(b"[") <= limits.max_nesting_depth
        and not (_DEEP_EMBEDDING.search(body) is not None if has_deep_embedding is None else has_deep_embedding)
    )


# Three backslashes in a row: JSON embedded in a string embedded in a string. A regular expression,
# not a substring test: its search skips from backslash to backslash, faster on escaped JSON.
_DEEP_EMBEDDING = re.compile(rb"\\\\\\")
_ESCAPE_OR_DEEP_EMBEDDING = re.compile(rb"\\(?:u[0-9a-fA-F]{4}|\\\\)")


def escape_or_deep_embedding(body: bytes) -> bool:
    """`has_unicode_escape(body) or` three backslashes in a row, in one search: False proves both
    absent from every part of `body` (a record's bytes are part of its body's)."""
    return _ESCAPE_OR_DEEP_EMBEDDING.search(body) is not None


def check_record(record: Any, limits: Limits, *, base_depth: int = 0) -> None:
    """Raise LimitExceeded when `record` is too deep or holds a too-long string. Iterative.

    Only containers go on the stack; strings are checked where they are met (the hot path).
    """
    max_depth, max_len = limits.max_nesting_depth, limits.max_string_length
    if isinstance(record, str):
        record = [record]
        base_depth -= 1
    elif not isinstance(record, (dict, list)):
        return
    # (container, depth of the container itself, embedded-JSON level)
    stack: list[tuple[Any, int, int]] = [(record, base_depth + 1, 0)]
    pop, push = stack.pop, stack.append
    while stack:
        value, depth, level = pop()
        if depth > max_depth:
            raise LimitExceeded(TOO_DEEP, f"nesting deeper than {max_depth}")
        if type(value) is dict:
            for key in value:
                if len(key) > max_len:
                    raise LimitExceeded(STRING_TOO_LONG, f"a key of {len(key)} characters, limit {max_len}")
            items: Any = value.values()
        else:
            items = value
        for item in items:
            kind = type(item)
            if kind is str:
                if len(item) > max_len:
                    raise LimitExceeded(STRING_TOO_LONG, f"a string of {len(item)} characters, limit {max_len}")
                head = item[:1]
                if head == "{" or head == "[" or (head.isspace() and looks_like_json(item)):
                    inner = embedded_json(item)
                    if inner is not None:
                        if level >= MAX_EMBEDDED_JSON_LEVELS:
                            raise LimitExceeded(TOO_DEEP, f"JSON embedded in strings more than {MAX_EMBEDDED_JSON_LEVELS} levels deep")
                        push((inner, depth + 1, level + 1))
            elif kind is dict or kind is list:
                push((item, depth + 1, level))


def walk(value: Any) -> Iterator[Any]:
    """Every node of a parsed JSON value, iteratively (for tests and diagnostics)."""
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


__all__ = [
    "BODY_TOO_LARGE",
    "DEFAULT_LIMITS",
    "LimitExceeded",
    "Limits",
    "STRING_TOO_LONG",
    "TOO_DEEP",
    "TOO_MANY_EVIDENCE",
    "TOO_MANY_RECORDS",
    "check_body_size",
    "check_evidence_count",
    "check_record",
    "records_surely_within",
    "check_record_count",
    "embedded_json",
    "escape_or_deep_embedding",
    "has_unicode_escape",
    "looks_like_json",
]
