"""A claimer in a process of its own, for the multi-process claim test (tests/state/test_state_table.py).

    python -m tests.support.state_claimer <table> fill <alerts>     store one part for each alert
    python -m tests.support.state_claimer <table> claim <folder>    say ready (a file in the folder), wait
                                                                    for the file `go` there, then claim in
                                                                    chunks of 3 until the file `stop` is there;
                                                                    print each alert id won, and append it to
                                                                    the folder's file won-<pid>

The claimers stop when the test says so, not after a few empty rounds: an empty round may only mean
that the others won its alerts, and a claimer that lost three in a row would leave the race early.

The connection string is in the environment variable tests.support.table_state.ENV.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from pipeline.ingest.formats import AlertPart
from pipeline.state.azure_table import TableStateStore
from tests.support.table_state import table_settings


async def main(table: str, command: str, argument: str) -> None:
    store = TableStateStore(table_settings(table))
    try:
        if command == "fill":
            alerts = int(argument)
            await store.add_parts([AlertPart(alert_id=f"m{i:04d}", rank=0, data={"n": i}) for i in range(alerts)], now=0)
            return
        await store.pending_count()  # open the client before the start
        folder = Path(argument)
        (folder / f"ready-{os.getpid()}").touch()
        while not (folder / "go").exists():
            await asyncio.sleep(0.005)
        record = folder / f"won-{os.getpid()}"
        while not (folder / "stop").exists():
            won = await store.claim_due(now=100, settle_seconds=0, max_hold_seconds=600, lease_seconds=3600, limit=3)
            if won:
                lines = "".join(f"{alert.alert_id}\n" for alert in won)
                print(lines, end="", flush=True)
                with record.open("a") as file:
                    file.write(lines)
                await asyncio.sleep(0.02)  # a real claimer delivers before it claims again: the others get their turn
            else:
                await asyncio.sleep(0.01)  # nothing won (lost the round, or nothing left): try again soon
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
