"""Headless Chromium through selenium, for the dashboard's browser tests and its benchmark.

Debian's `chromium` and `chromium-driver` packages provide the browser and its driver; .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import shutil

MISSING = ("the dashboard's browser tests need Debian's chromium and chromium-driver: "
           "`apt-get install chromium chromium-driver` (.ci/run does it), and selenium (`make venv`)")


def missing() -> str:
    """Why a browser cannot start here, or "" when it can."""
    if importlib.util.find_spec("selenium") is None:
        return MISSING + "; selenium is not installed"
    absent = [name for name in ("chromium", "chromedriver") if not shutil.which(name)]
    return f"{MISSING}; not on PATH: {', '.join(absent)}" if absent else ""


def chrome(width: int = 1400, height: int = 1000):
    """A headless Chromium that keeps its console messages (read them with console_errors)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--disable-extensions", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver from PATH, so that selenium never tries to download one.
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def console_errors(driver) -> list[str]:
    """The console's errors since the last call (reading the log empties it)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
