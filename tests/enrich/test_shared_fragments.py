"""Fewer passes per alert (issue 19, item 6): alerts of one user in one batch share the fragments that
depend only on the user (user_context for one day, telemetry for the same lookups), and a shared
fragment is dumped once for their records. Every alert still gets exactly the values it got alone."""

from __future__ import annotations

import orjson

from benchmarks import streams
from benchmarks.__main__ import bench_config
from pipeline.plugin_kit.testing import make_alerts
from pipeline.runner import Runner


def dense_alerts(users: int) -> list:
    """The split alerts of one DLP-dense body (25 alerts), spread over `users` users."""
    return make_alerts(streams.dense_bodies(1, users=users, seed=7)[0])


async def test_alerts_of_one_user_share_one_dump_of_their_user_and_telemetry_fragments(tmp_path):
    alerts = dense_alerts(users=3)
    async with Runner(bench_config(tmp_path)) as runner:
        records = (await runner.engine.enrich(alerts)).records
    by_user: dict[str, list] = {}
    for record in records:
        by_user.setdefault(record.alert.user.upn, []).append(record)
    assert len(records) == 25 and len(by_user) == 3
    for same in by_user.values():
        first = same[0]
        for name in ("user_context", "telemetry"):
            assert all(record.enrichments[name] is first.enrichments[name] for record in same), name
    # every alert of the body has the same types, no prior alert (they are all of one time) and the
    # same triage (equal reasons): one fragment of each, one dump for the batch
    for name in ("sensitive_info", "prior_incidents", "triage"):
        assert len({id(record.enrichments[name]) for record in records}) == 1, name
    one, other = (group[0] for group in list(by_user.values())[:2])
    assert one.enrichments["user_context"] is not other.enrichments["user_context"]


async def test_a_shared_fragment_gives_each_alert_what_it_gets_alone(tmp_path):
    alerts = dense_alerts(users=3)
    async with Runner(bench_config(tmp_path / "batch")) as runner:
        together = {record.alert.alert_id: record for record in (await runner.engine.enrich(alerts)).records}
    for alert in alerts[:6]:
        async with Runner(bench_config(tmp_path / alert.alert_id)) as runner:
            (alone,) = (await runner.engine.enrich([alert])).records
        for name in ("user_context", "telemetry", "sensitive_info", "prior_incidents", "triage"):
            assert orjson.dumps(together[alert.alert_id].enrichments[name]) == orjson.dumps(alone.enrichments[name])


async def test_alerts_of_one_user_on_different_days_do_not_share_their_user_context(tmp_path):
    """user_context counts the days to the user's last working day from the alert's own time: two
    alerts of one departing user, ten days apart, in one batch, each get the count they get alone."""
    from datetime import timedelta

    base = dense_alerts(users=1)[0]
    user = base.user.model_copy(update={"upn": "adele.vance@contoso.com"})  # leaves on 2025-03-28 (the bundled HR sample)
    early, late = (
        base.model_copy(update={"alert_id": alert_id, "user": user, "created_at": base.created_at + timedelta(days=days)})
        for alert_id, days in (("early", 0), ("late", 10))
    )
    async with Runner(bench_config(tmp_path / "batch")) as runner:
        together = {record.alert.alert_id: record.enrichments["user_context"] for record in (await runner.engine.enrich([early, late])).records}
    assert together["early"]["days_until_departure"] - together["late"]["days_until_departure"] == 10
    for alert in (early, late):
        async with Runner(bench_config(tmp_path / alert.alert_id)) as runner:
            (alone,) = (await runner.engine.enrich([alert])).records
        assert orjson.dumps(together[alert.alert_id]) == orjson.dumps(alone.enrichments["user_context"])


async def test_alerts_with_other_types_get_their_own_sensitive_info_summary(tmp_path):
    """The summaries shared in a batch are those of equal types, labels and correlation only: an
    alert whose type counts differ gets its own, with its own figures."""
    alerts = dense_alerts(users=1)
    base = alerts[1]
    changed = base.model_copy(update={"alert_id": "changed", "sensitive_info": [s.model_copy(update={"count": (s.count or 0) + 5}) for s in base.sensitive_info]})
    async with Runner(bench_config(tmp_path)) as runner:
        records = {record.alert.alert_id: record for record in (await runner.engine.enrich([*alerts[:3], changed])).records}
    first, other = records[alerts[0].alert_id].enrichments["sensitive_info"], records["changed"].enrichments["sensitive_info"]
    assert other is not first and records[alerts[2].alert_id].enrichments["sensitive_info"] is first
    assert other["total_count"] == first["total_count"] + 5 * len(base.sensitive_info)


async def test_the_dumps_of_unchanged_fragments_are_kept_across_batches_and_no_others(write_config, monkeypatch):
    """An enricher with `fragments_unchanged` (triage, say) that returns a fragment again in a later
    batch has it dumped once; one without it is dumped anew in every batch (it may have changed it).
    At most `KEPT_DUMPS` dumps are kept."""
    from pipeline.enrich import engine as engine_module
    from tests.support.config import enricher_entry, pipeline_toml

    config = pipeline_toml(enrichers=[enricher_entry("reuses_one", "tests.plugins:ReusesOne"), enricher_entry("claims", "tests.plugins:ReusesOneUnchanged")])
    alerts = dense_alerts(users=3)
    async with Runner(write_config(config)) as runner:
        first = (await runner.engine.enrich(alerts[:2])).records
        second = (await runner.engine.enrich(alerts[2:4])).records
        claims = next(slot.plugin for slot in runner.chain.slots if slot.name == "claims")
        claims.fragment = type(claims.fragment)(value="new")  # a second fragment to keep: past the bound, the first goes
        monkeypatch.setattr(engine_module, "KEPT_DUMPS", 1)
        await runner.engine.enrich(alerts[4:6])
        assert [kept for kept, _dump in runner.engine._kept.values()] == [claims.fragment]
    assert [r.enrichments["reuses_one"]["value"] for r in first + second] == ["1", "1", "2", "2"]  # dumped anew
    assert first[0].enrichments["claims"] is second[0].enrichments["claims"]  # kept: the first batch's dump
    assert second[0].enrichments["claims"]["value"] == "1"


async def test_triage_and_sensitive_info_dumps_are_kept_across_batches(tmp_path):
    alerts = dense_alerts(users=3)
    async with Runner(bench_config(tmp_path)) as runner:
        first = (await runner.engine.enrich(alerts[:10])).records
        second = (await runner.engine.enrich(alerts[10:20])).records
    for name in ("sensitive_info", "triage", "prior_incidents"):
        assert first[0].enrichments[name] is second[0].enrichments[name], name
