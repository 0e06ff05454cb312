"""Pipeline configs for tests: TOML text written into a test's folder and loaded as the CLI would."""

from __future__ import annotations

import textwrap
from pathlib import Path

from pipeline.config import LoadedConfig, load_config

# Assembly that never waits and one JSONL lake sink without fsync: the smallest config that delivers.
LAKE_ONLY = """
[assembly]
settle_seconds = 0

[[sinks]]
name = "lake"
kind = "jsonl"
[sinks.settings]
fsync = false
"""


def load_toml(folder: Path, body: str, *, name: str = "pipeline.toml") -> LoadedConfig:
    """Write `body` (dedented) as folder/name and load it, with folder/out as the data dir."""
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return load_config(path, data_dir=folder / "out")
