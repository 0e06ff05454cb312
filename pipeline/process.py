"""Process-wide settings that every entry point applies once (each runs a Runner)."""

from __future__ import annotations

import gc

# Python collects its youngest generation every 700 allocations by default; a batch allocates
# hundreds of thousands of short-lived objects (parsed JSON, models), and each collection also
# scans the long-lived caches it reaches. 20,000 measured 10-20 % more alerts/s (docs/performance.md).
GC_GEN0_THRESHOLD = 20_000


def raise_gc_threshold(gen0: int = GC_GEN0_THRESHOLD) -> None:
    """Raise the garbage collector's first threshold to `gen0` for this process (every entry point
    runs a Runner); a host that set a higher one keeps it. Collection itself stays on."""
    current = gc.get_threshold()
    if current[0] < gen0:
        gc.set_threshold(gen0, *current[1:])
