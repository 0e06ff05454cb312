"""Where things are in a checkout: the repository root, the shared format fixtures, the bundled samples."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "formats"
SAMPLES = ROOT / "pipeline" / "samples" / "messages"
