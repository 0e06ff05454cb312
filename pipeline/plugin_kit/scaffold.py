"""Generate a pip-installable enricher plugin package (`python -m pipeline new-enricher NAME`).

The package registers its enricher under the entry point group `dlp_pipeline.enrichers`, has a
typed Settings model, a README and tests that pass as generated (they use the fixtures of
`pipeline.plugin_kit.pytest_plugin`, which dlp-pipeline registers with pytest).
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

from pipeline.errors import ConfigError

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{1,40}$")


class ScaffoldError(ConfigError):
    """A name or target the generator refuses; the message says why (the CLI reports it like a bad setting)."""


def names(name: str) -> dict[str, str]:
    if not NAME_PATTERN.match(name) or keyword.iskeyword(name) or name.endswith("_"):
        raise ScaffoldError(f"enricher name {name!r}: use 2-41 lowercase letters, digits and underscores, starting with a letter (e.g. geo_ip)")
    camel = "".join(part.capitalize() for part in name.split("_") if part)
    return {
        "name": name,
        "package": f"dlp_enricher_{name}",
        "dist": f"dlp-enricher-{name.replace('_', '-')}",
        "cls": f"{camel}Enricher",
        "camel": camel,
    }


def generate(name: str, directory: Path) -> Path:
    """Write the package into directory/<dist name>/ and return that folder. Never overwrites."""
    values = names(name)
    root = Path(directory) / values["dist"]
    if root.exists():
        raise ScaffoldError(f"{root}: already exists; choose another --dir or remove it")
    for relative, template in FILES.items():
        path = root / Template(relative).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(values), encoding="utf-8")
    return root


FILES: dict[str, str] = {}

FILES["pyproject.toml"] = '''\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A DLP alert enricher for dlp-pipeline: $name"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["dlp-pipeline>=0.1", "pydantic>=2.7,<3"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.23"]

# How the pipeline finds the enricher once the package is installed: name it in the config as
#   [[enrichers]]
#   name = "$name"
[project.entry-points."dlp_pipeline.enrichers"]
$name = "$package.enricher:$cls"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]
asyncio_mode = "auto"
'''

FILES["README.md"] = '''\
# $dist

A dlp-pipeline enricher that adds the fragment `$name` to every DLP alert:
how many files the alert is about, the largest one, and whether the user's mail domain is one you
watch. Replace the logic in `src/$package/enricher.py` with your own.

## Install and use

```sh
pip install .            # or: pip install -e '.[test]' while developing
python -m pipeline validate --config pipeline.toml
```

```toml
# pipeline.toml
[[enrichers]]
name = "$name"           # the entry point this package registers
timeout_seconds = 2
[enrichers.settings]
watched_domains = ["fabrikam.com"]
large_file_bytes = 10000000
```

Unknown settings are rejected at start-up, naming the key.

## Output

```json
"enrichments": {"$name": {"file_count": 1, "largest_file_bytes": 48213, "large_files": 0,
                          "user_domain": "contoso.com", "watched_domain": false}}
```

The enricher returns `None` (recorded as `skipped`) when the alert names neither a user nor a file.

## Tests

```sh
pip install -e '.[test]'
pytest
```

The fixtures `dlp_alert`, `dlp_alert_any_format`, `dlp_alert_factory` and `run_enricher` come
from dlp-pipeline's pytest plugin (`pipeline.plugin_kit.pytest_plugin`); `run_enricher` runs the enricher
exactly as the pipeline does (timeout, outcome, duration).
'''

FILES["src/$package/__init__.py"] = '''\
"""$dist: the `$name` enricher for dlp-pipeline."""

from $package.enricher import $cls

__all__ = ["$cls"]
'''

FILES["src/$package/enricher.py"] = '''\
"""The `$name` enricher: file count and size, and whether the user's domain is watched."""

from __future__ import annotations

from pydantic import BaseModel, Field

from pipeline.enrich.contract import BaseEnricher, EnrichmentContext
from pipeline.models import DlpAlert


class $cls(BaseEnricher["$cls.Settings"]):  # self.settings is typed as $cls.Settings
    name = "$name"
    depends_on = ()      # names of enrichers whose fragments you read with ctx.fragment(name)
    timeout = 2.0        # seconds; the runner enforces it (the config's timeout_seconds overrides it)

    class Settings(BaseEnricher.Settings):  # unknown keys are rejected at start-up
        watched_domains: list[str] = Field(default_factory=list, description="mail domains to flag")
        large_file_bytes: int = Field(10_000_000, gt=0, description="a file at least this big counts as large")

    class Fragment(BaseModel):
        file_count: int
        largest_file_bytes: int | None
        large_files: int
        user_domain: str | None
        watched_domain: bool

    async def start(self) -> None:
        """Open clients or load files here (called once, before the first alert)."""

    async def enrich(self, alert: DlpAlert, ctx: EnrichmentContext) -> BaseModel | None:
        if alert.user is None and not alert.files:
            return None  # recorded as "skipped"
        sizes = [f.size for f in alert.files if f.size is not None]
        upn = alert.user.upn if alert.user else None
        domain = upn.rpartition("@")[2] if upn and "@" in upn else None
        watched = {d.lower() for d in self.settings.watched_domains}
        return self.Fragment(
            file_count=len(alert.files),
            largest_file_bytes=max(sizes) if sizes else None,
            large_files=sum(1 for size in sizes if size >= self.settings.large_file_bytes),
            user_domain=domain,
            watched_domain=domain in watched if domain else False,
        )
'''

FILES["tests/test_$name.py"] = '''\
"""Tests of the `$name` enricher. The fixtures come from dlp-pipeline's pytest plugin."""

from importlib.metadata import entry_points

import pytest
from pydantic import ValidationError

from $package import $cls


async def test_enriches_the_sample_alert(dlp_alert, run_enricher):
    fragment, status = await run_enricher($cls, dlp_alert, settings={"watched_domains": ["contoso.com"]})
    assert status.state == "ok", status.error
    assert fragment.file_count == len(dlp_alert.files)
    assert fragment.user_domain == "contoso.com" and fragment.watched_domain is True


async def test_large_files_are_counted(dlp_alert_factory, run_enricher):
    alert = dlp_alert_factory("graph_alert", files=[{"name": "a.xlsx", "size": 5}, {"name": "b.zip", "size": 50}])
    fragment, _ = await run_enricher($cls, alert, settings={"large_file_bytes": 10})
    assert (fragment.file_count, fragment.largest_file_bytes, fragment.large_files) == (2, 50, 1)


async def test_skips_an_alert_without_user_or_files(dlp_alert_factory, run_enricher):
    fragment, status = await run_enricher($cls, dlp_alert_factory("graph_alert", user=None, files=[]))
    assert fragment is None and status.state == "skipped"


async def test_every_input_format(dlp_alert_any_format, run_enricher):
    _, status = await run_enricher($cls, dlp_alert_any_format)
    assert status.state in ("ok", "skipped"), status.error


def test_settings_reject_unknown_keys():
    with pytest.raises(ValidationError):
        $cls.Settings(watched_domain=["typo.com"])


def test_the_entry_point_is_registered():
    (entry,) = [ep for ep in entry_points(group="dlp_pipeline.enrichers") if ep.name == "$name"]
    assert entry.load() is $cls
'''
