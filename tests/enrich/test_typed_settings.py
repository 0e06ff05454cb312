"""Enricher settings are typed: `BaseEnricher[SettingsT]` / `BatchEnricher[SettingsT]` tell a type checker what
`self.settings` is, and a plugin that does not parametrise the base works as before."""

from __future__ import annotations

import importlib
import typing

import pytest
from pydantic import ValidationError

from pipeline.enrich.contract import BaseEnricher, BatchEnricher
from pipeline.plugins import builtin_enrichers


class Typed(BaseEnricher["Typed.Settings"]):
    name = "typed"

    class Settings(BaseEnricher.Settings):
        database: str = "geo.mmdb"


class Untyped(BatchEnricher):
    """A third-party plugin written before the bases were generic."""

    name = "untyped"

    class Settings(BatchEnricher.Settings):
        threshold: int = 3


def test_a_parametrised_enricher_gets_its_own_settings_model():
    assert isinstance(Typed().settings, Typed.Settings) and Typed().settings.database == "geo.mmdb"
    given = Typed.Settings(database="other.mmdb")
    assert Typed(given).settings is given
    with pytest.raises(ValidationError):
        Typed.Settings(databse="typo")  # type: ignore[call-arg]  # a type checker sees the typo too


def test_an_unparametrised_enricher_works_as_before():
    assert isinstance(Untyped().settings, Untyped.Settings) and Untyped().settings.threshold == 3
    assert Untyped().lookup_timeout == pytest.approx(4.0)


@pytest.mark.parametrize("name,reference", sorted(builtin_enrichers().items()))
def test_every_built_in_enricher_names_its_settings_model_for_type_checkers(name, reference):
    module, _, attribute = reference.partition(":")
    cls = getattr(importlib.import_module(module), attribute)
    (base,) = [b for b in cls.__orig_bases__ if typing.get_origin(b) in (BaseEnricher, BatchEnricher)]
    (argument,) = typing.get_args(base)
    assert argument == typing.ForwardRef(f"{cls.__name__}.Settings") and cls.Settings is not BaseEnricher.Settings
