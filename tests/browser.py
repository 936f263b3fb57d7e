"""A headless Debian `chromium` driven by selenium through the system `chromedriver`: nothing is downloaded.

selenium-manager (which would fetch a browser and a driver) is never asked: the driver's path is given and
SE_OFFLINE is set. When chromium is missing and we are root with apt, `apt-get install -y chromium chromium-driver`
runs once (CI); otherwise the tests are skipped with that command in the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
INSTALL = ["apt-get", "install", "-y", "chromium", "chromium-driver"]


def ensure_chromium() -> None:
    if os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        r = subprocess.run(INSTALL, capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if r.returncode == 0 and os.path.exists(CHROMIUM) and os.path.exists(DRIVER):
            return
        pytest.skip(f"`{' '.join(INSTALL)}` failed: {r.stderr.strip().splitlines()[-1:] or r.returncode}")
    pytest.skip(f"no chromium + chromedriver: install them with `sudo {' '.join(INSTALL)}`")


def headless_chromium(user: str | None = None, password: str | None = None):
    """A selenium Chrome driver on the system chromium, 1280x1000, offline."""
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never go looking for a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(DRIVER), options=options)
