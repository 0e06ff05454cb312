"""pytest fixtures for enricher plugin authors, registered through the `pytest11` entry point.

Installed with `dlp-pipeline`, they are available in any test, with no conftest.py:

| fixture | what it gives |
|---|---|
| `dlp_alert` | the bundled Microsoft Graph DLP alert, decoded by the pipeline (`make_alert("graph_alert")`) |
| `dlp_alert_any_format` | the bundled alert of each input format in turn (the test runs four times) |
| `dlp_alert_factory` | `make_alert(source, **overrides)` |
| `fake_clock` | a `FakeClock` at `DEFAULT_NOW` |
| `enrichment_context` | `make_context(dlp_alert, now=fake_clock)`; build others with `make_context` |
| `run_enricher` | `await run_enricher(EnricherClass, alert, settings=..., upstream=...)` -> `(fragment, status)`, outputs under `tmp_path` |

See `pipeline/plugin_kit/testing.py` for the helpers themselves.
"""

from __future__ import annotations

import functools

import pytest

from pipeline.plugin_kit import testing


@pytest.fixture
def dlp_alert_factory():
    return testing.make_alert


@pytest.fixture
def dlp_alert():
    return testing.make_alert("graph_alert")


@pytest.fixture(params=testing.SAMPLE_FORMATS)
def dlp_alert_any_format(request):
    return testing.make_alert(request.param)


@pytest.fixture
def fake_clock():
    return testing.FakeClock()


@pytest.fixture
def enrichment_context(dlp_alert, fake_clock):
    return testing.make_context(dlp_alert, now=fake_clock)


@pytest.fixture
def run_enricher(tmp_path, fake_clock):
    return functools.partial(testing.run_enricher, now=fake_clock, data_dir=tmp_path)
