"""The worked example of docs/plugins.md runs as written: its code blocks are extracted and tested
with the plugin fixtures, against pytest-httpserver standing in for the VirusTotal API."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support.paths import ROOT


def code_blocks(text: str) -> dict[str, str]:
    return {m.group(1): m.group(0)[len("```python\n"):-len("```")] for m in re.finditer(r"```python\n# file: (\S+)\n.*?```", text, re.S)}


@pytest.mark.slow
def test_plugins_md_worked_example_passes_its_tests(tmp_path):
    blocks = code_blocks((ROOT / "docs" / "plugins.md").read_text())
    assert set(blocks) == {"file_reputation.py", "test_file_reputation.py"}
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "pipeline.plugin_kit.pytest_plugin", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto", "test_file_reputation.py"],
        cwd=tmp_path, env=env, capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout.decode()[-3000:] + result.stderr.decode()[-1000:]
    assert "3 passed" in result.stdout.decode()
