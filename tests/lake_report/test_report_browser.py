"""The report opened in a real headless browser (Debian's `chromium`, which .ci/run installs) with the
network unreachable: a screenshot that is not blank and shows the charts' colours, and the DOM the
browser built naming the top user and policy. Skipped, saying why, where no chromium is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.lake_report.render import BAR, COLOURS
from tests.lake_report.test_report import TOP_POLICY, TOP_USER, run_cli
from tests.support.png import read_png

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no headless browser: install Debian's chromium (apt-get install chromium) to render the report")


def headless(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Chromium on a local file, every host name unresolvable (so any fetch would fail)."""
    assert BROWSER is not None
    command = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
        *args, page.as_uri(),
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, timeout=120)


def hex_colour(value: str) -> tuple[int, int, int]:
    return int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16)


@pytest.mark.slow
def test_report_renders_offline_in_a_real_browser(tmp_path):
    assert run_cli("run", cwd=tmp_path).returncode == 0
    result = run_cli("report", "--out", "report.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    page = tmp_path / "report.html"

    shot = tmp_path / "report.png"
    rendered = headless(page, tmp_path / "profile-1", f"--screenshot={shot}", "--window-size=1280,1600", "--force-device-scale-factor=0.5")
    assert shot.exists(), rendered.stderr.decode()[-2000:]
    image = read_png(shot.read_bytes())
    assert (image.width, image.height) == (640, 800)
    colours = image.colours()
    background = max(colours, key=lambda colour: colours[colour])
    assert sum(n for colour, n in colours.items() if colour != background) > 0.05 * image.width * image.height  # not blank
    # The charts were drawn: pixels of the bar colour and of the severity colours (anti-aliasing aside).
    near = lambda target: sum(n for c, n in colours.items() if max(abs(a - b) for a, b in zip(c, target)) <= 8)  # noqa: E731
    assert near(hex_colour(BAR)) > 200 and near(hex_colour(COLOURS["high"])) > 20 and near(hex_colour(COLOURS["medium"])) > 20

    dom = headless(page, tmp_path / "profile-2", "--dump-dom")
    assert dom.returncode == 0, dom.stderr.decode()[-2000:]
    text = re.sub(r"<[^>]+>", " ", dom.stdout.decode())
    assert TOP_USER in text and TOP_POLICY in text and "DLP posture report" in text
    assert dom.stdout.decode().count("<svg") == 8
