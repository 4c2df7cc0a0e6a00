"""Headless Chromium for the slow UI tests: a page's rendered text and its screenshot (Debian's `chromium`)."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


class Browser:
    """One Chromium binary with one profile folder; `budget_ms` lets the single-page app fetch and render."""

    def __init__(self, profile: Path, window: str, budget_ms: int = 30_000) -> None:
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        if found is None:
            pytest.skip("needs Debian's chromium: apt-get update && apt-get install -y chromium")
        self.binary = found
        self.flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", f"--window-size={window}",
            f"--virtual-time-budget={budget_ms}", f"--user-data-dir={profile}",
        ]  # fmt: skip

    def text(self, url: str) -> str:
        """The rendered page's text (tags stripped, entities decoded)."""
        dom = subprocess.run([self.binary, *self.flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        return html.unescape(re.sub(r"<[^>]+>", " ", dom.stdout))

    def screenshot(self, url: str, name: str, fallback_dir: Path) -> bytes:
        """Save the page as `name` under MATHWIZARD_SCREENSHOT_DIR (or `fallback_dir`); returns the PNG's bytes."""
        png = Path(os.environ.get("MATHWIZARD_SCREENSHOT_DIR", fallback_dir)) / name
        png.parent.mkdir(parents=True, exist_ok=True)
        command = [self.binary, *self.flags, f"--screenshot={png}", url]
        subprocess.run(command, capture_output=True, timeout=180, check=True)
        return png.read_bytes()


def rendered(data: bytes) -> bool:
    """A PNG of a rendered page, not a blank one."""
    return data[:8] == PNG and len(data) > 20_000
