"""A claimer in a process of its own, for the multi-process claim test (tests/state/test_state_table.py).

    python -m tests.support.state_claimer <table> fill <alerts>     store one part for each alert
    python -m tests.support.state_claimer <table> claim <folder>    say ready (a file in the folder), wait
                                                                    for the file `go` there, then claim in
                                                                    chunks of 3 until none is left (three empty rounds);
                                                                    print each alert id won

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
        empty = 0
        while empty < 3:  # an empty round may only mean the others won that round's alerts
            won = await store.claim_due(now=100, settle_seconds=0, max_hold_seconds=600, lease_seconds=3600, limit=3)
            empty = 0 if won else empty + 1
            if won:
                print("\n".join(alert.alert_id for alert in won), flush=True)
                await asyncio.sleep(0.02)  # a real claimer delivers before it claims again: the others get their turn
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
