"""The report in a real browser: headless Chromium loads every figure, logs no error, runs no script.

Needs the Debian ``chromium`` package.  Skipped when it is absent, except under ``CI=true``,
where the missing browser is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from browser import find_chromium, open_page
from PIL import Image
from test_report_common import make_run

from cnncam.report import build_report

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = find_chromium()
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium executable: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium); required when CI=true")
    return exe


def test_harness_sees_dialogs_console_errors_and_broken_images(chromium: str, tmp_path: Path) -> None:
    """Positive control: the checks below would catch a script, an error or a missing image."""
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="nope.png"><script>console.error("bad"); alert(1)</script></body></html>'
    )
    seen = open_page(page, tmp_path / "bad.png")
    assert seen.dialogs == ["alert: 1"]
    assert any("bad" in e for e in seen.console_errors)
    assert seen.images == [("nope.png", 0)]


def test_report_renders_in_headless_chromium(chromium: str, tmp_path: Path) -> None:
    run = make_run(tmp_path, missing=(13,))
    index = build_report(run)
    # Open a copy elsewhere: the folder must work off the cluster, through relative links only.
    copy = tmp_path / "copied-report"
    shutil.copytree(index.parent, copy)
    summary = json.loads((copy / "summary.json").read_text())
    shot = tmp_path / "screenshot.png"

    page = open_page(copy / "index.html", shot)

    with Image.open(shot) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height > 3000  # the whole long page
    assert shot.stat().st_size > 50_000
    assert sorted(src for src, _ in page.images) == sorted(summary["figures"])
    for src, width in page.images:
        with Image.open(copy / src) as im:
            assert width == im.width, src  # naturalWidth > 0: decoded, and the right file
    assert page.console_errors == []
    assert page.dialogs == []
    assert "<script>alert(1)</script>" in page.inner_text  # the class name, shown as text
    assert "a$b & 'c'" in page.inner_text
    assert "image not available (file missing): heatmap only" in page.inner_text
