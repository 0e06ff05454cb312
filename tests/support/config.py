"""Pipeline configs for tests, built from plain dicts and written as the TOML text a user would write.

`pipeline_toml(...)` is the one place the sections tests keep repeating ([assembly], [delivery], the
local JSONL lake...) are spelled; tests say only what differs. The text it returns is guaranteed to
read back (with tomllib) as exactly the sections given, so a test's config means what its dicts say.
"""

from __future__ import annotations

import json
import re
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import LoadedConfig, load_config

Table = Mapping[str, Any]

# Split alerts are emitted at once: no test waits for missing parts unless it says so.
NO_SETTLE: Table = {"settle_seconds": 0}

# Retries fast enough for a test: a few attempts, millisecond backoff, a budget no test reaches.
FAST_RETRIES: Table = {"max_attempts": 3, "backoff_initial_seconds": 0.001, "backoff_max_seconds": 0.002, "budget_seconds": 5}

# The local JSONL lake without fsync (durability is not what these tests are about).
LAKE: Table = {"name": "lake", "kind": "jsonl", "settings": {"fsync": False}}


def sink_entry(name: str, kind: str, settings: Table | None = None, **options: Any) -> dict[str, Any]:
    """One [[sinks]] entry; `options` are the sink's other keys (when, fields, pseudonymise, enabled)."""
    entry: dict[str, Any] = {"name": name, "kind": kind, **options}
    if settings is not None:
        entry["settings"] = dict(settings)
    return entry


def blob_lake_entry(container: str, *, name: str = "lake", **settings: Any) -> dict[str, Any]:
    """A Blob lake sink writing to `container` (created if missing) through the connection string in
    TEST_LAKE_CONNECTION, which the test sets (to Azurite's); `settings` add to or override these."""
    return sink_entry(name, "blob", {"connection_string_env": "TEST_LAKE_CONNECTION", "container": container, "create_container": True, **settings})


def enricher_entry(name: str, use: str | None = None, settings: Table | None = None, **options: Any) -> dict[str, Any]:
    """One [[enrichers]] entry; `options` are its other keys (timeout_seconds, enabled)."""
    entry: dict[str, Any] = {"name": name}
    if use is not None:
        entry["use"] = use
    entry.update(options)
    if settings is not None:
        entry["settings"] = dict(settings)
    return entry


def pipeline_toml(
    *,
    runner: Table | None = None,
    assembly: Table | None = NO_SETTLE,
    state: Table | None = None,
    delivery: Table | None = None,
    dead_letter: Table | None = None,
    enrichers: Sequence[Table] = (),
    sinks: Sequence[Table] = (LAKE,),
    **sections: Any,
) -> str:
    """The TOML text of a pipeline config with these sections (None or empty leaves a section out).

    By default assembly does not wait for split parts and the only sink is the local lake (`LAKE`).
    Any other top-level section (limits, consumer...) is passed by its name in `sections`."""
    document: dict[str, Any] = {}
    named = {"runner": runner, "assembly": assembly, "state": state, "delivery": delivery, "dead_letter": dead_letter, **sections}
    document.update({key: dict(value) for key, value in named.items() if value is not None})
    if enrichers:
        document["enrichers"] = [dict(entry) for entry in enrichers]
    if sinks:
        document["sinks"] = [dict(entry) for entry in sinks]
    return toml_text(document)


def load_toml(folder: Path, body: str, *, name: str = "pipeline.toml") -> LoadedConfig:
    """Write `body` (dedented) as folder/name and load it, with folder/out as the data dir."""
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return load_config(path, data_dir=folder / "out")


def toml_text(document: Table) -> str:
    """TOML for `document` (tables as [sections], lists of tables as [[arrays]], the rest inline).

    Raises ValueError if the text would not read back as `document` (a value TOML cannot hold)."""
    lines: list[str] = []
    _table(lines, (), document)
    text = "\n".join(lines).strip("\n") + "\n"
    if tomllib.loads(text) != _plain(document):
        raise ValueError(f"this document does not survive a TOML round trip: {document!r}")
    return text


def _table(lines: list[str], path: tuple[str, ...], table: Table) -> None:
    """Append `table`'s keys, then its sub-tables under their headers (a blank line before each top-level one)."""
    nested = {key: table[key] for key in _nested(table)}
    lines.extend(f"{_key(key)} = {_value(value)}" for key, value in table.items() if key not in nested)
    gap = [""] if not path else []
    for key, value in nested.items():
        inner = (*path, key)
        if _is_table(value):
            if len(value) > len(_nested(value)) or not value:  # a table holding only sub-tables needs no header of its own
                lines.extend([*gap, f"[{_dotted(inner)}]"])
            _table(lines, inner, value)
        else:
            for entry in value:
                lines.extend([*gap, f"[[{_dotted(inner)}]]"])
                _table(lines, inner, entry)


def _nested(table: Table) -> list[str]:
    return [key for key, value in table.items() if _is_table(value) or _is_array_of_tables(value)]


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_array_of_tables(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(entry, Mapping) for entry in value)


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(_key(part) for part in path)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are all valid in TOML basic strings
    if isinstance(value, Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(key)} = {_value(item)}" for key, item in value.items()) + " }" if value else "{}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise ValueError(f"TOML cannot hold {type(value).__name__} values: {value!r}")


def _plain(value: Any) -> Any:
    """`value` as tomllib would read it back: mappings as dicts, sequences as lists, paths as strings."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


# The smallest config that delivers, as text, for the tests that append their own sections to it.
LAKE_ONLY = "\n" + pipeline_toml()

# The [[sinks]] entry of `LAKE` alone, as text, to end configs whose other sections a test writes as text.
LAKE_SINK_TOML = "\n" + pipeline_toml(assembly=None)
