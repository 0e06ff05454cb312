"""The error tree and the one table that maps library errors to it (pipeline/errors.py)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import enrichers
import pipeline
from pipeline.errors import ConfigError, DecodeError, PipelineError, SinkError

ROOT = Path(__file__).resolve().parent.parent


def project_modules() -> list[str]:
    """Every module of pipeline/ and enrichers/ (`__main__` is skipped: importing it runs the CLI)."""
    names = []
    for package in (pipeline, enrichers):
        names.append(package.__name__)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}."):
            if not info.name.endswith(".__main__"):
                names.append(info.name)
    return names


def project_exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for name in project_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == name:
                found[f"{name}.{attr}"] = value
    return found


def test_every_exception_the_project_defines_is_a_pipeline_error():
    classes = project_exception_classes()
    assert len(classes) >= 15  # the walk found the tree itself and the errors around it
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, PipelineError))
    assert outside == []


def test_each_error_sits_on_the_branch_its_callers_handle():
    from pipeline.deliver.sinks.itsm import TicketError
    from pipeline.ingest.inputs import InputError
    from pipeline.ingest.limits import LimitExceeded
    from pipeline.plugin_kit.scaffold import ScaffoldError
    from pipeline.secrets import SecretNotSet

    assert issubclass(InputError, ConfigError) and issubclass(ScaffoldError, ConfigError)  # the CLI: exit 2, "error: ..."
    assert issubclass(SecretNotSet, ConfigError) and issubclass(SecretNotSet, ValueError)  # a ValueError for plugin loaders and validators
    assert issubclass(LimitExceeded, DecodeError)
    assert issubclass(TicketError, SinkError)
    limit = LimitExceeded("body_too_large", "9 bytes, limit 8")
    assert (limit.reason, limit.detail, str(limit)) == ("body_too_large", "9 bytes, limit 8", "body_too_large: 9 bytes, limit 8")

