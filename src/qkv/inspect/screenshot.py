"""Screenshots of a local HTML page with headless Chromium, so that a person (or a test) can look
at the head view as a browser draws it.

Chromium is not a Python package: install it with the system's package manager (Debian/Ubuntu:
``apt-get install chromium``). :func:`find_browser` says whether one is on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: Executable names tried, in order, by :func:`find_browser`.
BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_browser() -> str | None:
    """The path of a Chromium-family browser on ``PATH`` (``$QKV_BROWSER`` first), or None."""
    for name in (os.environ.get("QKV_BROWSER"), *BROWSER_NAMES):
        if name and (found := shutil.which(name)):
            return found
    return None


def screenshot_html(html_path, png_path, *, fragment: str | None = None, size: tuple[int, int] = (1100, 800),
                    browser: str | None = None, timeout: float = 120.0) -> Path:
    """Open a local HTML file in headless Chromium and save what it shows as a PNG.

    Args:
        html_path: the page, e.g. from :func:`~qkv.inspect.write_head_view`.
        png_path: where to write the screenshot (parent folders are created).
        fragment: URL fragment without ``#``, e.g. ``"token=3&layer=0&head=0"`` to pre-select a
            token in a head view (a screenshot cannot hover).
        size: window ``(width, height)`` in CSS pixels, which is the PNG's size.
        browser: the browser executable; default :func:`find_browser`.
        timeout: seconds to wait for the browser.

    Returns:
        ``png_path`` as a :class:`~pathlib.Path`. Raises ``FileNotFoundError`` when no browser is
        found or the page does not exist, ``RuntimeError`` when the browser writes no screenshot.
    """
    page = Path(html_path).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"html_path: no such file {page}")
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium-family browser on PATH (tried " + ", ".join(BROWSER_NAMES)
                                + "); install one, e.g. 'apt-get install chromium', or set QKV_BROWSER")
    width, height = size
    png = Path(png_path).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    url = page.as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="qkv-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                   f"--user-data-dir={profile}", "--force-device-scale-factor=1",
                   f"--window-size={width},{height}", "--virtual-time-budget=2000",
                   f"--screenshot={png}", url]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if not png.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot (exit code {result.returncode}):\n"
                           + (result.stderr or result.stdout)[-2000:])
    return png
