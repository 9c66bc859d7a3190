"""Drives the clinician page (`radiag/serving/web/index.html`) in headless Chromium.

A helper for the serving and export tests, not a test itself: it opens the page with HTTP Basic
credentials (user `clinician`, password = the token), the way a browser does after its
login prompt, submits one diagnosis and reads back what the page shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
"""The system browser; Playwright's own browser downloads are not used."""
RESULT_TIMEOUT_MS = 120_000
LOAD_TIMEOUT_MS = 30_000


def _text(page: Page, selector: str) -> str:
    """The text of an element (shown or hidden), stripped; "" when it is absent."""
    found = page.query_selector(selector)
    return (found.text_content() or "").strip() if found else ""


@contextlib.contextmanager
def browser_page(token: str) -> Iterator[Page]:
    """A tab of headless Chromium that answers the login prompt with `token`."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(
                http_credentials={"username": "clinician", "password": token},
                viewport={"width": 1100, "height": 900},
            )
            yield context.new_page()
        finally:
            browser.close()


@contextlib.contextmanager
def signed_in_page(page_url: str, token: str) -> Iterator[Page]:
    """The page, signed in, once it is ready (models and form loaded)."""
    with browser_page(token) as page:
        page.goto(page_url)
        page.wait_for_function(
            "() => document.body.dataset.state === 'ready'", timeout=LOAD_TIMEOUT_MS
        )
        yield page


def fill_and_submit(page_url: str, token: str, screenshot: Path, model: str | None = None) -> dict:
    """Open the page, submit the first example (or the default record), and read the outcome.

    Waits for the model list, selects `model` when given, picks the first synthetic example
    when there is one, clicks Diagnose, waits up to 120 s for `body[data-state]` to become
    "done" or "error", and saves a full-page screenshot to `screenshot`.

    Returns {"state", "diagnosis", "description", "rationale", "error", "model",
    "warnings", "models"}; `model` the one submitted, `warnings` the texts of the answer's
    warnings list; `models`
    is the list of option values of the model selector. When the page itself is refused
    (a wrong token: 401), nothing is submitted and "error" holds that status and body.
    """
    with browser_page(token) as page:
        response = page.goto(page_url)
        if response is not None and not response.ok:  # e.g. a refused token: no page at all
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            error = f"{response.status}: {response.text().strip()}"
            return dict.fromkeys(("diagnosis", "description", "rationale"), "") | {
                "state": "error",
                "error": error,
                "warnings": [],
                "model": "",
                "models": [],
            }
        page.wait_for_function(
            "() => ['ready', 'error'].includes(document.body.dataset.state)",
            timeout=LOAD_TIMEOUT_MS,
        )
        models: list[str] = page.eval_on_selector_all(
            "#model option", "options => options.map(o => o.value).filter(v => v)"
        )
        if page.evaluate("document.body.dataset.state") == "ready":
            if model is not None:
                if model not in models:
                    raise ValueError(f"model {model!r} is not offered; the page has {models}")
                page.select_option("#model", model)
            if page.locator("#example option").count() > 1:
                page.select_option("#example", index=1)
            page.click("#submit")
            page.wait_for_function(
                "() => ['done', 'error'].includes(document.body.dataset.state)",
                timeout=RESULT_TIMEOUT_MS,
            )
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        return {
            "state": page.evaluate("document.body.dataset.state"),
            "diagnosis": _text(page, "#diagnosis"),
            "description": _text(page, "#description"),
            "rationale": _text(page, "#rationale"),
            "error": _text(page, "#error"),
            "model": page.eval_on_selector("#model", "select => select.value"),
            "warnings": page.eval_on_selector_all(
                "#warnings li", "items => items.map(i => i.textContent)"
            ),
            "models": models,
        }
