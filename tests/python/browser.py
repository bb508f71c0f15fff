"""Headless Chromium (Debian's chromium + chromium-driver, installed by scripts/test.sh)
driven by Selenium, for tests that look at the admin dashboard as a person would.

Selenium is pointed at the system chromedriver: Selenium Manager would try to download
a browser and a driver, and test machines have no internet. A missing browser is an
error, never a skip."""
import contextlib
import os
import shutil
import tempfile
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = os.environ.get("CHROMIUM_BIN", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER_BIN", "/usr/bin/chromedriver")


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 800):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise RuntimeError(
                f"{path} is missing: install Debian's chromium and chromium-driver "
                "(./scripts/test.sh does)")
    profile = tempfile.mkdtemp(prefix="tollgate-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        # No network but loopback here: keep Chromium from phoning home and stalling.
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions",
        f"--window-size={width},{height}", f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(30)
        # --window-size sizes the window; make the viewport exactly width x height.
        inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        driver.set_window_size(width + (width - inner[0]), height + (height - inner[1]))
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.2, what: str = "condition",
               driver=None):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` s
    (and, given the driver, what the page's error banner said)."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as e:  # the page may be mid-update (stale element): poll again
            last_error = e
        time.sleep(interval)
    message = f"timed out after {timeout}s waiting for {what}"
    if last_error:
        message += f" (last error: {last_error!r})"
    if driver is not None:
        message += f"; page {driver.current_url!r} titled {driver.title!r}"
        banner = driver.execute_script(
            "const b = document.getElementById('error-banner'); return b && !b.hidden ? b.textContent : null")
        if banner:
            message += f"; error banner: {banner}"
    raise AssertionError(message)
