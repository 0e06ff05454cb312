"""Per-sink minimisation: a field projection, keyed pseudonymisation, and the ITSM alert key.

A sink entry of the config may carry

    fields = ["alert.alert_id", "alert.severity", "alert.files.name", "enrichments.triage.score"]
    pseudonymise = { key_env = "LAKE_PSEUDONYM_KEY" }   # fields default to the user identifiers

`fields` is an allow-list of dotted paths into the enriched record (`record.to_dict()`); a path that
crosses a list applies to every element (`alert.files.name` keeps only the name of each file).
`record_id` is always kept. Without `fields` the sink gets the full record.

`pseudonymise` replaces the listed values with `hmac:` + the first 32 hex digits of
HMAC-SHA256(key, value): the same user gives the same pseudonym in every record (joins still work),
but the value cannot be read back without the key. The key comes from an environment variable,
never from the config file.

The runner hands a minimised sink `ProjectedRecord` objects instead of `EnrichedRecord`s:
`record_id`, `to_dict()`, `to_json()` and a read-only `alert` view behave the same, and fields
outside the allow-list are simply absent. Routing (`when`) and dead-lettering still see the full
record; only what leaves through the sink is minimised.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from pipeline.config import USER_IDENTIFIERS, PseudonymiseSettings
from pipeline.errors import ConfigError

__all__ = ["USER_IDENTIFIERS", "PseudonymiseSettings", "Minimiser", "ProjectedRecord", "alert_key", "minimiser_for"]


def alert_key(record: Any) -> str:
    """The key of the *alert* (not of one revision of it): tenant, source format, kind and alert id.

    A revised record of the same alert (late evidence, new enrichment) has a new `record_id` but the
    same alert key, so an ITSM sink updates the alert's ticket instead of opening a second one.
    """
    known = getattr(record, "alert_key", None)
    if isinstance(known, str):
        return known
    alert = record.alert
    parts = (alert.tenant_id or "", alert.source_format, alert.kind, alert.alert_id)
    return "dlp-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def record_document(record: Any) -> dict[str, Any]:
    """The JSON document a sink sends for a record (projected when the sink is minimised)."""
    return record.to_dict()


def get_path(document: Any, path: str, default: Any = None) -> Any:
    """The value at a dotted path (`alert.user.upn`); lists are not crossed here."""
    value = document
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return default
        value = value[part]
    return value


def _project(value: Any, tree: dict[str, Any]) -> Any:
    if isinstance(value, list):
        return [_project(item, tree) for item in value]
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for name, sub in tree.items():
        if name not in value:
            continue
        out[name] = copy.deepcopy(value[name]) if sub is None else _project(value[name], sub)
    return out


def _tree(paths: Sequence[str]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for path in paths:
        node = root
        parts = path.split(".")
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if last:
                node[part] = None  # keep the whole subtree
            else:
                if node.get(part, {}) is None:
                    break  # an ancestor is already kept whole
                node = node.setdefault(part, {})
    return root


def _rewrite(value: Any, parts: list[str], transform) -> Any:
    if isinstance(value, list):
        return [_rewrite(item, parts, transform) for item in value]
    if not parts:
        return transform(value)
    if isinstance(value, dict) and parts[0] in value:
        value[parts[0]] = _rewrite(value[parts[0]], parts[1:], transform)
    return value


def _attribute(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return _View(value)
    if isinstance(value, str) and name.endswith("_at"):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    return value


class _View:
    """Read-only attribute access over a projected dict, as on the models: absent fields read as
    None, `*_at` fields as datetimes."""

    __slots__ = ("_data",)

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _attribute(self._data.get(name), name)


class ProjectedRecord:
    """What a minimised sink receives instead of an EnrichedRecord.

    `record_id`, `alert_key` and `processed_at` are always there (pipeline metadata a sink may need
    for keys and partitions); everything else only if the allow-list kept it.
    """

    __slots__ = ("record_id", "alert_key", "processed_at", "_data")

    def __init__(self, record_id: str, alert_key: str, data: dict[str, Any], processed_at: datetime | None = None) -> None:
        self.record_id = record_id
        self.alert_key = alert_key
        self.processed_at = processed_at
        self._data = data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = self._data.get(name)
        if name == "alert":
            return _View(value or {})
        if name in ("enrichments", "enrichment_status"):
            return value or {}
        return _attribute(value, name)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def to_json(self) -> bytes:
        return orjson.dumps(self._data)


def check_path(path: str) -> None:
    """Raise ValueError for a path that cannot exist in an enriched record (a typo in an allow-list).
    Dict keys (`enrichments.<name>`, `enrichment_status.<name>`) are free; below an enrichment
    fragment anything goes."""
    import typing

    from pydantic import BaseModel

    from pipeline.models import EnrichedRecord

    def resolve(annotation: Any) -> tuple[Any, bool]:
        """(the model reached, whether a free dict key comes first); (None, False) for free-form."""
        origin = typing.get_origin(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation, False
        if origin is dict:
            value, _ = resolve(typing.get_args(annotation)[1])
            return value, True
        for arg in typing.get_args(annotation):  # Optional[...], list[...]
            if arg is not type(None):
                found, keyed = resolve(arg)
                if found is not None or keyed:
                    return found, keyed
        return None, False

    model: Any = EnrichedRecord
    parts = path.split(".")
    index = 0
    while index < len(parts) and model is not None:
        part = parts[index]
        if part not in model.model_fields:
            raise ValueError(f"'{path}': {'.'.join(parts[:index]) or 'the record'} has no field '{part}'")
        model, keyed = resolve(model.model_fields[part].annotation)
        index += 2 if keyed else 1


class Minimiser:
    """Projection plus pseudonymisation of one sink, built once from its config entry."""

    def __init__(self, fields: Sequence[str] | None, pseudonymise: PseudonymiseSettings | None, *, environ: dict[str, str] | None = None) -> None:
        for path in fields or ():
            try:
                check_path(path)
            except ValueError as exc:
                raise ValueError(f"fields: {exc}") from None
        for path in pseudonymise.fields if pseudonymise is not None else ():
            try:
                check_path(path)
            except ValueError as exc:
                raise ValueError(f"pseudonymise.fields: {exc}") from None
        self.tree = _tree(["record_id", *fields]) if fields is not None else None
        self.key: bytes | None = None
        self.pseudonymised: list[list[str]] = []
        if pseudonymise is not None:
            env = os.environ if environ is None else environ
            secret = env.get(pseudonymise.key_env)
            if not secret:
                raise ValueError(f"pseudonymise.key_env: environment variable {pseudonymise.key_env} is not set")
            if len(secret.encode()) < 16:
                raise ValueError(f"pseudonymise.key_env: the key in {pseudonymise.key_env} is shorter than 16 bytes")
            self.key = secret.encode()
            self.pseudonymised = [path.split(".") for path in pseudonymise.fields]

    def pseudonym(self, value: Any) -> Any:
        if not isinstance(value, str) or not value or self.key is None:
            return value
        return "hmac:" + hmac.new(self.key, value.encode(), hashlib.sha256).hexdigest()[:32]

    def apply(self, record: Any) -> ProjectedRecord:
        document = record.to_dict()
        if self.tree is not None:
            document = _project(document, self.tree)
        for parts in self.pseudonymised:
            _rewrite(document, parts, self.pseudonym)
        return ProjectedRecord(record.record_id, alert_key(record), document, getattr(record, "processed_at", None))


def minimiser_for(entry: Any, config: Any, key: str) -> Minimiser | None:
    """The minimiser of a sink entry with `fields` or `pseudonymise`, else None (the sink gets the full record).

    A path that cannot exist or a missing pseudonym key fails here, at start-up, naming the config key."""
    fields = getattr(entry, "fields", None)
    pseudonymise = getattr(entry, "pseudonymise", None)
    if fields is None and pseudonymise is None:
        return None
    try:
        return Minimiser(fields, pseudonymise)
    except ValueError as exc:
        raise ConfigError(str(exc).split(": ", 1)[1], file=config.display_name, key=f"{key}.{str(exc).split(':', 1)[0]}") from None
