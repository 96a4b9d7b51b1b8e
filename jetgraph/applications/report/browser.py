"""Drive an explorer page in headless Chromium (Playwright with Debian's browser): what the
browser tests check and what makes the docs' screenshots, in one place. Needs the ``dev`` extra
(``playwright``) and a ``chromium`` on the PATH; nothing is downloaded."""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from pathlib import Path


class BrowserMissing(RuntimeError):
    """Playwright or Chromium is not installed here."""


def chromium() -> str:
    """The Chromium executable, or :class:`BrowserMissing` naming what to install."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise BrowserMissing("playwright is not installed (pip install playwright)") from None
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        raise BrowserMissing("no Chromium on this machine (apt-get install chromium)")
    return found


@contextlib.contextmanager
def opened(path: str | Path, width: int = 1400,
           height: int = 900) -> Iterator[tuple[object, list[str], float]]:
    """``(page, problems, seconds)``: the page loaded and drawn (``data-ready``), every script error
    and every request that left the file collected in ``problems``, and the load time."""
    from playwright.sync_api import sync_playwright

    executable = chromium()
    problems: list[str] = []
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
            page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}")
                    if message.type == "error" else None)
            page.on("request", lambda request: None if request.url.startswith(("file:", "about:", "data:"))
                    else problems.append(f"fetched {request.url}"))
            start = time.perf_counter()
            page.goto(Path(path).resolve().as_uri())
            page.wait_for_selector("body[data-ready=true]", timeout=60_000)
            yield page, problems, time.perf_counter() - start
        finally:
            browser.close()


def show_view(page: object, title: str) -> None:
    """Switch the page to the view whose tab reads ``title`` (its first match)."""
    page.locator("nav button", has_text=title).first.click()


def screenshots(path: str | Path, folder: str | Path) -> dict[str, object]:
    """One PNG per view of the page at ``path`` into ``folder`` (the lens with a cell hovered),
    named ``{page}-{kind}.png`` (``-{kind}-2`` for the second of a kind), with the load time and
    any problems: what docs/explorer.md shows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shots = {}
    with opened(path) as (page, problems, seconds):
        seen: dict[str, int] = {}
        for index in range(page.locator("nav button").count()):
            page.locator("nav button").nth(index).click()
            section = page.locator(f"#view-{index}")
            kind = section.get_attribute("data-kind")
            seen[kind] = seen.get(kind, 0) + 1
            if section.locator("#lens-grid").count():
                section.locator("#lens-grid tr:nth-child(4) td:nth-child(5)").hover()
            name = kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"
            shot = folder / f"{Path(path).stem}-{name}.png"
            page.screenshot(path=str(shot), full_page=False)
            shots[name] = shot
        return {"seconds": seconds, "problems": list(problems), "shots": shots}


__all__ = ["BrowserMissing", "chromium", "opened", "screenshots", "show_view"]
