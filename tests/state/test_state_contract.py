"""The StateStore contract (tests/support/state_contract.py) run against every implementation.

To add one, add one `pytest.param` to `STORES`: a function of the pytest request that returns an
opener, a callable giving a new handle on one and the same backing store on every call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from pipeline.state import StateStore
from pipeline.state.sqlite import SqliteStateStore
from tests.support.state_contract import OpenState, StateStoreContract


def sqlite_store(request: pytest.FixtureRequest) -> OpenState:
    path = request.getfixturevalue("tmp_path") / "state.sqlite"
    return lambda: SqliteStateStore(path)


STORES: list[object] = [
    pytest.param(sqlite_store, id="sqlite"),
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
