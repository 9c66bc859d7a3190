"""The clinician's web page at `/`, in headless Chromium against the real app: the model
list loads, a synthetic example is submitted, the answer appears in the DOM."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pytest
from conftest import ServedApp

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,  # the session's trained run and served app
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)"
    ),
]


def test_a_clinician_submits_an_example_and_sees_the_diagnosis(
    served_app: ServedApp, tmp_path: Path
) -> None:
    from page_driver import fill_and_submit

    shot = tmp_path / "page.png"
    shown = fill_and_submit(served_app.url + "/", served_app.token, shot)
    assert shown["state"] == "done", shown["error"]
    assert shown["model"] == "student-text"  # the default: the quickest that explains itself
    assert "student-text" in shown["models"] and "baseline-logistic-tabular" in shown["models"]
    assert shown["diagnosis"].split()[0] in {"AD", "MCI", "CN"}
    assert shown["description"].startswith("This patient is")
    assert all(w.startswith("Warning: the rationale argues for") for w in shown["warnings"])
    pixels = matplotlib.image.imread(shot)
    assert pixels[..., :3].std() > 0.05  # text and the probability bars, not a blank page


def test_the_page_shows_nothing_without_the_token(served_app: ServedApp, tmp_path: Path) -> None:
    from page_driver import fill_and_submit

    shown = fill_and_submit(served_app.url + "/", "wrong-token-0123456789", tmp_path / "p.png")
    assert shown["state"] == "error" and "401" in shown["error"]
    assert "Not signed in" in shown["error"] and "{" not in shown["error"]  # no raw JSON
    assert shown["diagnosis"] == ""
