"""The behaviour every `pipeline.state.StateStore` implementation must show, written once.

Subclass `StateStoreContract` in a test module that provides an `open_state` fixture: a callable
that opens the implementation under test (each call a new handle on the *same* backing store, as a
second process would see it), closing what it opened at teardown. tests/state/test_state_contract.py does
that for every implementation, one parametrised line each.

Times are explicit `now` values, never the wall clock, so every rule is checked at its boundary.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.ingest.formats.contract import AlertPart
from pipeline.state import REDELIVERY_FORGET_SECONDS, StateStore
from pipeline.state.history import HistoryEntry

OpenState = Callable[[], StateStore]

SETTLE = 10.0
MAX_HOLD = 60.0
LEASE = 30.0


def part(alert_id: str, rank: int = 0, **data: object) -> AlertPart:
    return AlertPart(alert_id=alert_id, rank=rank, data={"alert_id": alert_id, "rank": rank, **data})


async def claim(store: StateStore, now: float, *, force: bool = False, limit: int | None = None) -> list[str]:
    claimed = await store.claim_due(now=now, settle_seconds=SETTLE, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE, force=force, limit=limit)
    return [alert.alert_id for alert in claimed]


class StateStoreContract:
    """The guarantees of the `StateStore` protocol (pipeline/state/__init__.py), one test each."""

    @pytest.fixture
    def store(self, open_state: OpenState) -> StateStore:
        return open_state()

    def test_it_satisfies_the_protocol(self, store: StateStore) -> None:
        assert isinstance(store, StateStore)

    # -- add_parts -----------------------------------------------------------------------------

    async def test_a_part_is_stored_once_and_counted_as_duplicate_after(self, store: StateStore) -> None:
        first = await store.add_parts([part("a", 0), part("a", 1), part("b", 0)], now=0)
        again = await store.add_parts([part("a", 1), part("b", 0), part("b", 0)], now=1)
        assert (first.new, first.duplicate, first.over_limit) == (3, 0, [])
        assert (again.new, again.duplicate) == (0, 3)
        assert await store.pending_count() == 2

    async def test_the_same_part_twice_in_one_call_is_stored_once(self, store: StateStore) -> None:
        added = await store.add_parts([part("a", 0), part("a", 0)], now=0)
        assert (added.new, added.duplicate) == (1, 1)
        (pending,) = await store.claim_due(now=0, settle_seconds=0, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE)
        assert len(pending.parts) == 1

    async def test_parts_over_the_limit_are_returned_not_stored(self, store: StateStore) -> None:
        await store.add_parts([part("a", 0), part("a", 1)], now=0)
        added = await store.add_parts([part("a", 2), part("a", 3), part("a", 0), part("b", 0)], now=1, max_parts_per_alert=3)
        assert added.new == 2 and added.duplicate == 1  # a:2 (the third part of a) and b:0
        assert [(p.alert_id, p.rank) for p in added.over_limit] == [("a", 3)]
        (alert,) = [a for a in await store.claim_due(now=100, settle_seconds=SETTLE, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE) if a.alert_id == "a"]
        assert [p.rank for p in alert.parts] == [0, 1, 2]

    async def test_claimed_parts_come_back_whole_ordered_by_rank(self, store: StateStore) -> None:
        stored = [part("a", 2, user="u@contoso.com"), part("a", 0, title="t"), part("a", 1, files=["x.docx"])]
        await store.add_parts(stored, now=0)
        (pending,) = await store.claim_due(now=100, settle_seconds=SETTLE, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE)
        assert pending.alert_id == "a"
        assert [(p.rank, p.data, p.digest) for p in pending.parts] == [(p.rank, p.data, p.digest) for p in sorted(stored, key=lambda p: p.rank)]

    # -- claim_due -----------------------------------------------------------------------------

    async def test_an_alert_is_claimed_once_no_part_came_for_settle_seconds(self, store: StateStore) -> None:
        await store.add_parts([part("a", 0)], now=0)
        await store.add_parts([part("a", 1)], now=8)
        assert await claim(store, 17.9) == []
        assert await claim(store, 18) == ["a"]

    async def test_an_alert_still_receiving_parts_is_claimed_after_max_hold(self, store: StateStore) -> None:
        for at in range(0, 60, 5):
            await store.add_parts([part("a", at)], now=at)
        assert await claim(store, 59) == []
        await store.add_parts([part("a", 100)], now=60)
        assert await claim(store, 60) == ["a"]

    async def test_force_claims_every_pending_alert_settled_or_not(self, store: StateStore) -> None:
        await store.add_parts([part("a", 0), part("b", 0)], now=0)
        assert await claim(store, 1) == []
        assert sorted(await claim(store, 1, force=True)) == ["a", "b"]

    async def test_limit_claims_the_oldest_first(self, store: StateStore) -> None:
        for at, alert_id in enumerate(["c", "a", "d", "b"]):
            await store.add_parts([part(alert_id)], now=at)
        assert await claim(store, 100, limit=2) == ["c", "a"]
        assert await claim(store, 100, limit=2) == ["d", "b"]  # the first two are leased now

    async def test_force_claims_leased_alerts_too(self, store: StateStore) -> None:
        """A flush (end of a run) emits everything pending, even alerts a failed batch left leased."""
        await store.add_parts([part("a")], now=0)
        await store.add_parts([part("b")], now=1)
        assert await claim(store, 100, limit=1) == ["a"]
        assert await claim(store, 100, force=True) == ["a", "b"]

    async def test_a_claimed_alert_is_leased_then_claimed_again_when_the_lease_runs_out(self, store: StateStore) -> None:
        await store.add_parts([part("a")], now=0)
        assert await claim(store, 100) == ["a"]
        assert await claim(store, 100 + LEASE - 1) == []
        assert await store.pending_count() == 1  # leased, still pending: at-least-once
        assert await claim(store, 100 + LEASE) == ["a"]

    async def test_a_lease_is_seen_by_a_second_handle_on_the_same_store(self, open_state: OpenState) -> None:
        first, second = open_state(), open_state()
        await first.add_parts([part("a"), part("b")], now=0)
        assert sorted(await claim(first, 100, limit=1) + await claim(second, 100)) == ["a", "b"]
        assert await claim(second, 101) == []

    # -- mark_emitted, release ------------------------------------------------------------------

    async def test_an_emitted_alert_is_not_claimed_again(self, store: StateStore) -> None:
        await store.add_parts([part("a"), part("b")], now=0)
        assert sorted(await claim(store, 100)) == ["a", "b"]
        await store.mark_emitted(["a"], now=100)
        assert await store.pending_count() == 1
        assert await claim(store, 100 + LEASE) == ["b"]
        assert await claim(store, 1000, force=True) == ["b"]

    async def test_released_alerts_can_be_claimed_again_at_once(self, store: StateStore) -> None:
        await store.add_parts([part("a"), part("b")], now=0)
        assert sorted(await claim(store, 100)) == ["a", "b"]
        await store.mark_emitted(["b"], now=100)
        await store.release(["a", "b"])  # b was emitted: releasing it changes nothing
        assert await claim(store, 101) == ["a"]
        assert await store.pending_count() == 1

    async def test_nothing_to_do_is_fine(self, store: StateStore) -> None:
        added = await store.add_parts([], now=0)
        await store.mark_emitted([], now=0)
        await store.release([])
        assert (added.new, added.duplicate, added.over_limit) == (0, 0, [])
        assert await claim(store, 0, force=True) == [] and await store.pending_count() == 0

    async def test_a_late_part_reopens_an_emitted_alert_with_all_its_parts(self, store: StateStore) -> None:
        await store.add_parts([part("a", 0)], now=0)
        assert await claim(store, 100) == ["a"]
        await store.mark_emitted(["a"], now=100)
        assert (await store.add_parts([part("a", 0)], now=200)).duplicate == 1  # a redelivered part: still emitted
        assert await store.pending_count() == 0
        late = await store.add_parts([part("a", 1)], now=300)
        assert late.new == 1 and await store.pending_count() == 1
        assert await claim(store, 300 + SETTLE - 1) == []  # it settles again from the late part
        (revised,) = await store.claim_due(now=300 + SETTLE, settle_seconds=SETTLE, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE)
        assert revised.alert_id == "a" and [p.rank for p in revised.parts] == [0, 1]

    async def test_a_part_that_comes_while_its_alert_is_claimed_is_not_lost_by_the_mark(self, open_state: OpenState) -> None:
        """A second handle (another instance) stores a new part of an alert while the first has it
        claimed (enriching it): the first's mark must leave the alert pending, so the new part comes
        out in a revision, instead of marking it emitted with the part never emitted."""
        first, second = open_state(), open_state()
        await first.add_parts([part("a", 0)], now=0)
        assert await claim(first, 100) == ["a"]
        assert (await second.add_parts([part("a", 1)], now=101)).new == 1  # meanwhile, elsewhere
        await first.mark_emitted(["a"], now=102)
        assert await first.pending_count() == 1
        (revised,) = await second.claim_due(now=101 + SETTLE, settle_seconds=SETTLE, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE)
        assert revised.alert_id == "a" and [p.rank for p in revised.parts] == [0, 1]

    async def test_a_handle_does_not_claim_again_an_alert_its_running_claim_holds(self, store: StateStore) -> None:
        """Two batches of one runner: the first claimed the alert and is still at work when a late part
        makes it due again. The second must not take it over (the first one's mark would then mark the
        second one's claim emitted, and the late part would be lost if the second batch failed): the
        alert waits, pending, and comes out with the late part once the first batch is done."""
        await store.add_parts([part("a", 0)], now=0)
        assert await claim(store, 100) == ["a"]  # the first batch; its lease runs until 130
        await store.add_parts([part("a", 1)], now=101)
        second = await claim(store, 101 + SETTLE)  # settled again, the first batch still at work
        assert second == []
        await store.mark_emitted(["a"], now=112)  # the first batch is done, without the late part
        (revised,) = await store.claim_due(now=112, settle_seconds=SETTLE, max_hold_seconds=MAX_HOLD, lease_seconds=LEASE)
        assert revised.alert_id == "a" and [p.rank for p in revised.parts] == [0, 1]

    async def test_marking_or_releasing_an_alert_this_handle_did_not_claim_changes_nothing(self, open_state: OpenState) -> None:
        first, second = open_state(), open_state()
        await first.add_parts([part("a", 0)], now=0)
        await first.mark_emitted(["a"], now=100)  # never claimed
        assert await first.pending_count() == 1
        assert await claim(second, 100) == ["a"]
        await first.release(["a"])  # second's claim, not first's
        assert await claim(first, 101) == []  # still leased to second

    async def test_max_hold_of_a_reopened_alert_counts_from_its_late_part(self, store: StateStore) -> None:
        await store.add_parts([part("a", 0)], now=0)
        assert await claim(store, 100) == ["a"]
        await store.mark_emitted(["a"], now=100)
        for at in range(1000, 1000 + int(MAX_HOLD), 5):
            await store.add_parts([part("a", at)], now=at)
        assert await claim(store, 1000 + MAX_HOLD - 1) == []
        assert await claim(store, 1000 + MAX_HOLD) == ["a"]

    # -- purge -----------------------------------------------------------------------------------

    async def test_purge_removes_alerts_emitted_before_the_cutoff_only(self, store: StateStore) -> None:
        await store.add_parts([part("old"), part("new"), part("waiting")], now=0)
        await claim(store, 100)
        await store.release(["waiting"])
        await store.mark_emitted(["old"], now=100)
        await store.mark_emitted(["new"], now=200)
        assert await store.purge(emitted_before=150) == 1
        assert await store.purge(emitted_before=150) == 0
        assert await store.pending_count() == 1
        again = await store.add_parts([part("old"), part("new")], now=300)
        assert (again.new, again.duplicate) == (1, 1)  # a purged alert's part is new again; a kept one is recognised

    # -- redeliveries ----------------------------------------------------------------------------

    async def test_redeliveries_are_counted_per_fingerprint(self, store: StateStore) -> None:
        assert [await store.count_redelivery("f1", now=t) for t in (0, 1, 2)] == [1, 2, 3]
        assert await store.count_redelivery("f2", now=3) == 1
        await store.forget_redelivery("f1")
        assert await store.count_redelivery("f1", now=4) == 1
        assert await store.count_redelivery("f2", now=5) == 2
        await store.forget_redelivery("never-counted")

    async def test_redelivery_counts_are_durable_and_shared(self, open_state: OpenState) -> None:
        first, second = open_state(), open_state()
        await first.count_redelivery("f", now=0)
        await first.count_redelivery("f", now=1)
        assert await second.count_redelivery("f", now=2) == 3
        await second.forget_redelivery("f")
        assert await first.count_redelivery("f", now=3) == 1

    async def test_redelivery_counts_older_than_the_forget_window_are_dropped(self, store: StateStore) -> None:
        await store.count_redelivery("stale", now=0)
        await store.count_redelivery("stale", now=10)
        await store.count_redelivery("fresh", now=10 + REDELIVERY_FORGET_SECONDS - 1)
        assert await store.count_redelivery("stale", now=10 + REDELIVERY_FORGET_SECONDS + 1) == 1
        assert await store.count_redelivery("fresh", now=10 + REDELIVERY_FORGET_SECONDS + 1) == 2

    # -- local history ---------------------------------------------------------------------------

    async def test_local_history_when_offered_keeps_entries_and_leaves_the_state_open(self, store: StateStore) -> None:
        history = store.local_history(retention_days=1)
        if history is None:
            return  # this store has none: the history settings decide where it lives
        await history.start()
        entry = HistoryEntry(entry_id="a", content_id="c", user="u@contoso.com", at=50.0, policy="p")
        await history.record("alert", [entry])
        assert [e.entry_id for e in await history.entries("alert", "u@contoso.com", since=0, until=100)] == ["a"]
        await history.aclose()
        assert (await store.add_parts([part("a")], now=0)).new == 1  # closing the history did not close the state
