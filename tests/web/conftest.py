"""Fixtures of the dashboard tests: a real browser (Debian's chromium driven by Playwright, never a
downloaded one), skipped when missing, or failing under LIFECYCLE_REQUIRE_SERVICES=1 (CI installs it)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REQUIRE_SERVICES

CHROMIUM = os.environ.get("LIFECYCLE_TEST_CHROMIUM", "/usr/bin/chromium")


def _missing(message: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{message} and LIFECYCLE_REQUIRE_SERVICES=1 is set", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless chromium per test module: Playwright's event loop is closed again before the async
    tests of the next module run (on Python 3.10 it would still count as running in this thread)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        _missing(f"{CHROMIUM} is missing: apt-get install -y chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page (its own context: storage, time zone) per test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        yield page
    finally:
        context.close()


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the browser tests save their screenshots (``LIFECYCLE_SCREENSHOTS`` to keep them)."""
    chosen = os.environ.get("LIFECYCLE_SCREENSHOTS")
    if chosen:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("screenshots")
