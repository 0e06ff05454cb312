"""The StateStore contract (tests/support/state_contract.py) run against every implementation.

To add one, add one `pytest.param` to `STORES`: a function of the pytest request that returns an
opener, a callable giving a new handle on one and the same backing store on every call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from pipeline.state import StateStore
from pipeline.state.azure_table import TableStateStore
from pipeline.state.sqlite import SqliteStateStore
from tests.support.state_contract import OpenState, StateStoreContract
from tests.support.table_state import ENV, table_name, table_settings


def sqlite_store(request: pytest.FixtureRequest) -> OpenState:
    path = request.getfixturevalue("tmp_path") / "state.sqlite"
    return lambda: SqliteStateStore(path)


def table_store(request: pytest.FixtureRequest) -> OpenState:
    """A fresh table on the suite's Azurite; every handle a store of its own, as another instance has."""
    azurite = request.getfixturevalue("azurite")
    request.getfixturevalue("monkeypatch").setenv(ENV, azurite.connection_string)
    settings = table_settings(table_name())
    return lambda: TableStateStore(settings)


STORES: list[object] = [
    pytest.param(sqlite_store, id="sqlite"),
    pytest.param(table_store, id="azure_table", marks=pytest.mark.integration),
]


@pytest.fixture(params=STORES)
async def open_state(request: pytest.FixtureRequest) -> AsyncIterator[OpenState]:
    make: Callable[[pytest.FixtureRequest], OpenState] = request.param
    opener = make(request)
    opened: list[StateStore] = []

    def open_one() -> StateStore:
        opened.append(opener())
        return opened[-1]

    yield open_one
    for store in opened:
        await store.aclose()


class TestStateStore(StateStoreContract):
    pass
