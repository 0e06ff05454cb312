"""The canonical DLP alert and the enriched record the sinks receive.

Every input format decodes to `DlpAlert`. It never holds matched sensitive values or the text
around them: the decoders drop those before a model is built, and the model has no field for them.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import to_jsonable_python

SourceFormat = Literal["defender_streaming", "graph_alert", "management_activity", "sentinel_alert"]
Severity = Literal["informational", "low", "medium", "high", "unknown"]
AlertKind = Literal["alert", "activity"]
EnrichmentState = Literal["ok", "skipped", "failed", "timed_out"]
# Where a DLP match stands: the user overrode it, reported it as a false positive, or the policy
# action was undone (DlpRuleUndo: enforcement reversed, for an override, a false-positive report, a
# document or a policy change). See docs/architecture.md, "DLP lifecycle".
LifecycleState = Literal["matched", "overridden", "reported_false_positive", "undone"]

SEVERITY_RANK: dict[str, int] = {"unknown": 0, "informational": 1, "low": 2, "medium": 3, "high": 4}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserRef(_Model):
    """The user the alert is about. `upn` is lowercased."""

    upn: str | None = None
    object_id: str | None = None
    display_name: str | None = None

    @field_validator("upn")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.strip().lower() if value else None


class FileRef(_Model):
    name: str | None = None
    path: str | None = None
    size: int | None = None
    sha256: str | None = None
    sensitivity_label_id: str | None = None


class DeviceRef(_Model):
    name: str | None = None
    device_id: str | None = None
    platform: str | None = None


class SensitiveInfo(_Model):
    """One sensitive information type found: what and how much, never the matched values."""

    name: str | None = None
    type_id: str | None = None
    count: int | None = None
    confidence: int | None = None


class DlpRule(_Model):
    """One rule of a DLP policy that matched: its own severity, mode and actions."""

    name: str | None = None
    rule_id: str | None = None
    severity: Severity = "unknown"
    mode: str | None = None
    actions: list[str] = Field(default_factory=list)
    overridden_actions: list[str] = Field(default_factory=list)


class DlpPolicy(_Model):
    """One DLP policy that matched, with every rule of it that matched."""

    name: str | None = None
    policy_id: str | None = None
    rules: list[DlpRule] = Field(default_factory=list)


class DlpException(_Model):
    """What the source says the user did about the match (Management Activity `ExceptionInfo`).

    `justification` is the user's own free text: it may hold anything (even the matched values), so it
    is None unless `[lifecycle] keep_user_justification` is set, and it is never logged."""

    override: bool = False
    false_positive: bool = False
    reason: str | None = None
    rule_ids: list[str] = Field(default_factory=list)
    justification: str | None = None


class LifecycleEvent(_Model):
    """One event of a match's lifecycle, as the source recorded it (audit record id, operation, time)."""

    record_id: str | None = None
    operation: Literal["DlpRuleMatch", "DlpInfo", "DlpRuleUndo"]
    state: LifecycleState
    at: datetime | None = None


class Lifecycle(_Model):
    """Where the match stands (`state`, of its latest event) and every event of it seen so far, in
    event order. The same events give the same lifecycle whatever order they arrived in."""

    state: LifecycleState = "matched"
    events: list[LifecycleEvent] = Field(default_factory=list)


class DlpAlert(_Model):
    """One Purview DLP alert (kind "alert") or DLP rule-match activity (kind "activity").

    A Management Activity match's `alert_id` is the id of the match (`dlpmatch-…`, see
    pipeline/ingest/formats/management_activity.py `match_key`), the same for every event of it;
    each event's own audit record id is in `lifecycle.events`."""

    # Logged and used as a key by sinks: bounded, and no control characters (no forged log lines).
    alert_id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$")
    # An identifier, never a path: sinks build folder and blob names from it (docs/security.md).
    tenant_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    source_format: SourceFormat
    kind: AlertKind = "alert"
    title: str | None = None
    severity: Severity = "unknown"
    status: str | None = None
    category: str | None = None
    created_at: datetime | None = None
    first_activity_at: datetime | None = None
    last_activity_at: datetime | None = None
    policy_name: str | None = None
    rule_name: str | None = None
    workload: str | None = None
    user: UserRef | None = None
    files: list[FileRef] = Field(default_factory=list)
    device: DeviceRef | None = None
    sensitive_info: list[SensitiveInfo] = Field(default_factory=list)
    shared_externally: bool | None = None
    incident_id: str | None = None
    alert_url: str | None = None
    incident_url: str | None = None
    # Every policy and rule that matched; `policy_name`/`rule_name` are the first of them, kept for
    # readers of the older shape. `severity` is the highest rule's when the source gives rules.
    policies: list[DlpPolicy] = Field(default_factory=list)
    exception: DlpException | None = None
    lifecycle: Lifecycle | None = None
    # Optional fields the source sent broken, set to null: "<field>: <why>", never the value.
    decode_warnings: list[str] = Field(default_factory=list)

    # The alert's JSON and content id, computed once, are kept in `__pydantic_private__`, made at the
    # first use (None until then), and read from it directly, ~30x faster than through pydantic's
    # attribute hook. Not declared as private attributes: pydantic would then call a Python hook
    # after validating each alert to set their defaults (15 % of the validation of a split alert).
    def to_json(self) -> bytes:
        """The alert's JSON. Computed once: an alert is not changed after it is decoded (copy it to
        change it; `model_copy` forgets what was computed)."""
        private = self.__pydantic_private__
        if private is None:
            json = self.__pydantic_serializer__.to_json(self)
            object.__setattr__(self, "__pydantic_private__", {"_json": json})
            return json
        cached: bytes | None = private.get("_json")
        if cached is None:
            cached = private["_json"] = self.__pydantic_serializer__.to_json(self)
        return cached

    def content_id(self) -> str:
        """A stable id of this alert's content: the same content always gives the same id."""
        private = self.__pydantic_private__
        content_id = private.get("_content_id") if private is not None else None
        if content_id is None:
            # Field order is fixed by the model and no field is a free-form dict, so the JSON
            # serialisation is canonical without sorting.
            content_id = hashlib.sha256(self.to_json()).hexdigest()[:32]
            private = self.__pydantic_private__  # made by to_json
            if private is not None:
                private["_content_id"] = content_id
        return content_id

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> DlpAlert:
        copied = super().model_copy(update=update, deep=deep)
        object.__setattr__(copied, "__pydantic_private__", None)  # what was computed is forgotten
        return copied


class EnrichmentStatus(_Model):
    state: EnrichmentState
    error: str | None = None
    duration_ms: float = 0.0


_STATUS_FIELDS = tuple(EnrichmentStatus.model_fields)  # in the model's order, as pydantic writes them


class EnrichedRecord(_Model):
    """What every sink receives: one line of the lake.

    `record_id` depends only on the alert's content, so a re-run or a redelivery of the same alert
    gives the same id; sinks use it as their idempotency key.
    """

    record_id: str
    alert: DlpAlert
    enrichments: dict[str, dict[str, Any]] = Field(default_factory=dict)
    enrichment_status: dict[str, EnrichmentStatus] = Field(default_factory=dict)
    pipeline_version: str
    processed_at: datetime

    def to_json(self) -> bytes:
        """The record's JSON, byte for byte what pydantic writes for it, built with orjson around the
        alert's JSON (computed once per alert, for its content id): no per-record re-serialisation."""
        try:
            return orjson.dumps(
                {
                    "record_id": self.record_id,
                    "alert": orjson.Fragment(self.alert.to_json()),
                    "enrichments": self.enrichments,
                    "enrichment_status": {
                        name: {field: getattr(status, field) for field in _STATUS_FIELDS} for name, status in self.enrichment_status.items()
                    },
                    "pipeline_version": self.pipeline_version,
                    "processed_at": self.processed_at,
                },
                default=to_jsonable_python,
                option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS,
            )
        except TypeError:  # what orjson cannot write (a non-string key, an int beyond 64 bits): pydantic's own way
            return self.__pydantic_serializer__.to_json(self)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# Fields without which an alert is not one, or that a wrong value makes dangerous (the tenant decides
# where an alert is filed): a broken value here rejects the record (dead letter).
REQUIRED_ALERT_FIELDS = frozenset({"alert_id", "source_format", "tenant_id"})
_MAX_REPAIRS = 4


def validate_alert(fields: Mapping[str, Any]) -> DlpAlert:
    """The alert of `fields`, keeping what is usable: a broken optional field (a malformed time, a
    count that is not a number) becomes null, or its default, with a warning in `decode_warnings`
    ("<field path>: <why>", never the value). Raises pydantic's ValidationError only when a required
    field (`REQUIRED_ALERT_FIELDS`) is broken or missing, or a field the model does not know is given."""
    try:
        return DlpAlert.model_validate(fields)
    except ValidationError as exc:
        error = exc
    data = copy.deepcopy(dict(fields))
    nulled: set[tuple[Any, ...]] = set()
    for _ in range(_MAX_REPAIRS):
        warnings = list(data.get("decode_warnings") or [])
        for problem in error.errors(include_url=False, include_input=False, include_context=False):
            location = tuple(problem["loc"])
            if not location or location[0] in REQUIRED_ALERT_FIELDS or location[0] not in DlpAlert.model_fields or location[0] == "decode_warnings":
                raise error
            _repair(data, location, drop=location in nulled)
            nulled.add(location)
            warnings.append(f"{'.'.join(str(part) for part in location)}: {problem['msg']}")
        data["decode_warnings"] = list(dict.fromkeys(warnings))
        try:
            return DlpAlert.model_validate(data)
        except ValidationError as exc:
            error = exc
    raise error


def clean_alert_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` as `validate_alert` repairs them, as JSON-ready canonical fields (for parts stored
    before the alert is built). Raises ValidationError as `validate_alert` does."""
    return validate_alert(fields).model_dump(mode="json")


def _repair(data: dict[str, Any], location: tuple[Any, ...], *, drop: bool) -> None:
    """Null the value at `location`; the second time (null is not allowed there either), remove it,
    or remove its whole top-level field when it sits in a list."""
    parent: Any = data
    for part in location[:-1]:
        try:
            parent = parent[part]
        except (KeyError, IndexError, TypeError):
            data.pop(location[0], None)
            return
    leaf = location[-1]
    if isinstance(parent, dict) and leaf in parent:
        if drop:
            del parent[leaf]
        else:
            parent[leaf] = None
    elif len(location) > 1:
        data.pop(location[0], None)
    else:
        data.pop(leaf, None)


def validation_summary(exc: ValidationError) -> str:
    """Where and why validation failed, without the offending values (they may be sensitive)."""
    problems = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False)[:5]:
        location = ".".join(str(part) for part in error["loc"]) or "(root)"
        problems.append(f"{location}: {error['msg']}")
    return "; ".join(problems)
