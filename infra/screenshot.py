"""Open the live dashboard in headless Chromium: a screenshot of a running stack.

    python -m infra.screenshot --user 188 --out reports/dashboard.png

The stack's read API (``API_HTTP_PORT``) serves the page; ``--user`` picks the user
whose trajectory the embedding-space plot draws. Needs Chromium and its driver (Debian:
``apt-get install chromium chromium-driver``) and selenium (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from shared.config import Settings

WINDOW = (1400, 1000)


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) when both are installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_browser() -> WebDriver:
    """Headless Chromium driven by selenium.

    Raises:
        RuntimeError: Chromium or its driver is not installed.
    """
    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("Chromium not found: apt-get install chromium chromium-driver")
    browser, driver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    return webdriver.Chrome(service=Service(driver), options=options)


def show_user(page: WebDriver, user: str, timeout_s: float = 30.0) -> None:
    """Type ``user`` into the embedding-space box and wait until their path is drawn
    (at least one position)."""
    box = page.find_element(By.ID, "user")
    box.clear()
    box.send_keys(user)

    def drawn(p: WebDriver) -> bool:
        note = str(p.find_element(By.ID, "space-note").text)
        return note.endswith(f"of user {user}") and not note.startswith("0 ")

    WebDriverWait(page, timeout_s).until(drawn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--user", default="196")
    parser.add_argument("--out", type=Path, default=Path("reports/dashboard.png"))
    parser.add_argument("--wait", type=float, default=5.0, help="seconds of streaming first")
    args = parser.parse_args()
    settings = Settings()
    page = open_browser()
    try:
        page.get(f"http://127.0.0.1:{settings.api_http_port}/dashboard")
        show_user(page, args.user)
        time.sleep(args.wait)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.save_screenshot(str(args.out))
    finally:
        page.quit()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
