"""A small soak run in the default suite (the full one: `python -m tests.soak --alerts 100000`, see docs/delivery.md)."""

from __future__ import annotations

from tests.soak import soak


def test_small_soak_accounts_for_every_alert_with_a_sink_failing_a_fifth_of_its_calls(tmp_path):
    result = soak(2000, tmp_path, batch_size=20)
    assert result["checks"] and all(result["checks"].values()), result["checks"]
    assert result["flaky_failed_calls"] > 0.1 * result["flaky_calls"]  # the faults really happened
    assert "delivered:           flaky=2001, lake=2001" in result["summary"] and "dead-lettered:       2 (decode=2)" in result["summary"]
