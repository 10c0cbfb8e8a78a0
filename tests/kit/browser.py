"""One way to drive a page in a real browser: Debian's headless Chromium through its version-matched
chromedriver (scripts/install-chromium.sh, run by `make tools`), with Selenium.

    async with chromium() as page:
        await page.goto(url)
        rows = await page.wait_for("return document.querySelectorAll('tr').length >= 3 && ...")
        await page.screenshot(tmp_path / "page.png")

Selenium's calls block, and the servers under test run in the test's own event loop: every call here runs in
a worker thread, so the loop keeps serving while the browser waits on it. Bounded throughout: every WebDriver
command (30 s), page load and script; the browser is always ended, by `quit()`, else by killing the driver
and every Chromium process of this session's own profile directory, by PID.

Chromium starts with a proxy that goes nowhere: loopback is reached directly, anything else fails at once,
so a page that needs the network outside this machine shows it (see `external_requests`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

COMMAND_TIMEOUT = 30.0
"""Seconds any one WebDriver command may take (Selenium's default is 120)."""
INSTALL_HINT = "run `make tools` (scripts/install-chromium.sh installs Debian's chromium and chromium-driver)"
_NOWHERE = "http://127.0.0.1:9"
"""The discard port: nothing listens there, so a request that is not to loopback fails at once."""


def binaries() -> tuple[str, str]:
    """The Chromium and chromedriver executables; an AssertionError naming the install step when missing."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    assert browser and driver, f"chromium and chromedriver are needed: {INSTALL_HINT}"
    return browser, driver


def options(browser: str, profile: Path, width: int, height: int) -> webdriver.ChromeOptions:
    chosen = webdriver.ChromeOptions()
    chosen.binary_location = browser
    flags = [
        "--headless=new", f"--window-size={width},{height}", "--force-device-scale-factor=1", "--hide-scrollbars",
        f"--user-data-dir={profile}", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-default-apps", "--mute-audio",
        "--disable-features=Translate,MediaRouter,OptimizationHints", f"--proxy-server={_NOWHERE}",
    ]
    if os.geteuid() == 0:
        flags.append("--no-sandbox")  # Chromium refuses to start its sandbox as root
    for flag in flags:
        chosen.add_argument(flag)
    chosen.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return chosen


class Page:
    """The browser's one tab. Each method is one or a few WebDriver commands, run in a thread."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def goto(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def run(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body: `return ...`) in the page; `arguments[i]` are `args`."""
        return await self.call(self.driver.execute_script, script, *args)

    async def wait_for(self, script: str, *args: Any, within: float = 10.0, step: float = 0.2) -> Any:
        """Poll `script` until it returns something truthy; return that. Fails with the last value seen."""
        value: Any = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            value = await self.run(script, *args)
            if value:
                return value
            if loop.time() >= deadline:
                raise AssertionError(f"the page did not get there within {within:g}s (last value: {value!r})")
            await asyncio.sleep(step)

    async def click(self, css: str) -> None:
        """A real click (mouse events at the element's centre), as a user's."""
        element = await self.call(self.driver.find_element, "css selector", css)
        await self.call(element.click)

    async def type(self, css: str, text: str) -> None:
        element = await self.call(self.driver.find_element, "css selector", css)
        await self.call(element.send_keys, text)

    async def screenshot(self, path: Path) -> Path:
        """The viewport as a PNG at `path` (its folder is created)."""
        png: bytes = await self.call(self.driver.get_screenshot_as_png)
        await asyncio.to_thread(_write, path, png)
        return path

    async def console(self) -> list[dict[str, Any]]:
        """What the page logged to its console since the last call (errors, warnings, log lines)."""
        entries: list[dict[str, Any]] = await self.call(self.driver.get_log, "browser")
        return entries

    async def external_requests(self, origin: str) -> list[str]:
        """Every resource the page loaded that did not come from `origin` (e.g. a CDN)."""
        names: list[str] = await self.run("return performance.getEntriesByType('resource').map(e => e.name)")
        return [name for name in names if not name.startswith(origin)]


@contextlib.asynccontextmanager
async def chromium(width: int = 1280, height: int = 800, load_within: float = 20.0) -> AsyncIterator[Page]:
    """A headless Chromium whose viewport is `width` x `height`; `load_within` bounds a page load and a
    script (seconds)."""
    browser, driver_path = binaries()
    profile = Path(tempfile.mkdtemp(prefix="signalbox-chromium-"))
    service = Service(driver_path, log_output=os.devnull)
    driver: webdriver.Chrome | None = None
    try:
        driver = await asyncio.wait_for(
            asyncio.to_thread(webdriver.Chrome, options=options(browser, profile, width, height), service=service),
            COMMAND_TIMEOUT,
        )
        driver.command_executor.client_config.timeout = COMMAND_TIMEOUT
        driver.set_page_load_timeout(load_within)
        driver.set_script_timeout(load_within)
        await asyncio.to_thread(_viewport, driver, width, height)
        yield Page(driver)
    finally:
        if driver is not None:
            with contextlib.suppress(WebDriverException, TimeoutError, OSError):
                await asyncio.wait_for(asyncio.to_thread(driver.quit), 15.0)
        _kill_leftovers(service, profile)
        shutil.rmtree(profile, ignore_errors=True)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """Make the page's viewport (what a screenshot shows) `width` x `height`: the window is that size, and
    the viewport smaller by whatever the headless window keeps for itself."""
    inner_width, inner_height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    if (inner_width, inner_height) != (width, height):
        driver.set_window_size(2 * width - inner_width, 2 * height - inner_height)


def _kill_leftovers(service: Service, profile: Path) -> None:
    """After quit(): the driver and any Chromium process started with this session's profile, by PID."""
    process = getattr(service, "process", None)
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(5)
    marker = f"--user-data-dir={profile}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone already, or not ours to read
