"""What the shared samples and fixtures contain, for tests that must find (or never find) it downstream."""

from __future__ import annotations

# Test card numbers and context strings present in the shared samples' DetectedValues.
MATCHED_VALUES = ("4111 1111 1111 1111", "5555 5555 5555 4444", "SYNTHETIC TEST DATA", "card on file")
