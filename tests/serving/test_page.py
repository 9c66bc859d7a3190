"""The clinician's web page at `/`, in headless Chromium against the real app: the model
list loads, a synthetic example is submitted, the answer appears in the DOM; the record is
a form that checks each field, greys out what the chosen model does not read and mirrors
the JSON view; the teacher's exemplars link to their records."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pyarrow.parquet as pq
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


def test_the_record_form_checks_fields_greys_out_what_a_model_ignores_and_mirrors_the_json(
    served_app: ServedApp,
) -> None:
    from page_driver import signed_in_page

    sent: list[dict] = []
    with signed_in_page(served_app.url + "/", served_app.token) as page:
        page.on(
            "request",
            lambda r: sent.append(json.loads(r.post_data or "{}"))
            if r.url.endswith("/v1/diagnose") else None,
        )  # fmt: skip
        mmse = page.locator("#f-MMSE")
        assert (mmse.get_attribute("min"), mmse.get_attribute("max")) == ("0", "30")
        assert page.locator("label[for=f-Hippocampus] .unit").text_content() == "mm³"

        page.select_option("#model", "baseline-logistic-tabular")  # no cognitive scores
        assert "unused" in page.locator(".fld[data-field=MMSE]").get_attribute("class")
        assert "not read by baseline-logistic-tabular" in page.locator("#n-MMSE").text_content()
        assert "unused" not in page.locator(".fld[data-field=Hippocampus]").get_attribute("class")
        page.select_option("#model", "student-text")
        assert "unused" not in page.locator(".fld[data-field=MMSE]").get_attribute("class")

        mmse.fill("45")
        assert page.locator("#e-MMSE").text_content() == "MMSE must be between 0 and 30"
        page.click("#submit")
        assert page.evaluate("document.body.dataset.state") == "error"
        assert "MMSE must be between 0 and 30" in page.locator("#error").text_content()
        assert sent == []  # nothing left the page

        mmse.fill("24")
        assert json.loads(page.locator("#patient").input_value())["MMSE"] == 24
        page.click("#advanced summary")  # the JSON view fills the form, keeping what it lacks
        page.locator("#patient").fill('{"AGE": 81, "MMSE": 19, "EXAMDATE": "2020-01-15"}')
        assert page.locator("#f-AGE").input_value() == "81"
        assert page.locator("#f-Hippocampus").input_value() == ""
        page.click("#submit")
        page.wait_for_function("() => document.body.dataset.state === 'done'", timeout=120_000)
    assert [s["patient"] for s in sent] == [{"AGE": 81, "MMSE": 19, "EXAMDATE": "2020-01-15"}]


def test_the_teachers_exemplars_link_to_the_records_it_was_shown(served_app: ServedApp) -> None:
    """The answer is the shape the served teacher gives (its real answers take a minute on
    two cores and are tested in test_teacher.py); the exemplar records come from the app."""
    from page_driver import signed_in_page

    train = pq.read_table(served_app.run / "splits" / "train.parquet").to_pylist()
    shown = [r for r in train if r["label"]][:2]
    answer = {
        "model": "teacher", "identity": "0" * 16, "patient_id": "request",
        "description": "This patient is a person.", "rationale": "Reasoning.",
        "diagnosis": "MCI", "exemplar_ids": [r["patient_id"] for r in shown], "warnings": [],
    }  # fmt: skip
    with signed_in_page(served_app.url + "/", served_app.token) as page:
        page.route("**/v1/diagnose", lambda route: route.fulfill(json=answer))
        page.click("#submit")
        page.wait_for_function("() => document.body.dataset.state === 'done'")
        links = page.locator("#exemplars a")
        assert links.all_text_contents() == answer["exemplar_ids"]
        links.nth(1).click()
        record = page.locator("#exemplar-1")
        record.locator("pre").wait_for()
        assert record.locator("pre").text_content() == shown[1]["description"]
        assert f"{shown[1]['patient_id']} — {shown[1]['label']}" in record.text_content()


def test_a_decided_diagnosis_is_highlighted_and_explained_when_it_is_not_the_longest_bar(
    served_app: ServedApp,
) -> None:
    """A student's balanced or validation-fitted decision can answer a class that is not the
    most probable; the page marks the answered class, not the longest bar, and says why."""
    from page_driver import signed_in_page

    answer = {
        "model": "student-text", "identity": "0" * 16, "patient_id": "request",
        "description": "This patient is a person.", "rationale": "Reasoning.",
        "diagnosis": "MCI", "probabilities": {"AD": 0.25, "MCI": 0.30, "CN": 0.45},
        "decision": "balanced", "warnings": [],
    }  # fmt: skip
    with signed_in_page(served_app.url + "/", served_app.token) as page:
        page.route("**/v1/diagnose", lambda route: route.fulfill(json=answer))
        page.click("#submit")
        page.wait_for_function("() => document.body.dataset.state === 'done'")
        assert page.locator("#probabilities tr.top th").text_content().startswith("MCI")
        assert page.locator("#decision").is_visible()
        assert "need not be the longest bar" in page.locator("#decision").text_content()
        # Offsets fitted on the validation split are explained as such.
        page.route("**/v1/diagnose", lambda route: route.fulfill(json=answer | {
            "diagnosis": "AD", "decision": "validation"}))  # fmt: skip
        page.click("#submit")
        page.wait_for_function(
            "() => document.querySelector('#probabilities tr.top th').textContent.startsWith('AD')"
        )
        assert "validation patients" in page.locator("#decision").text_content()
        # The plain argmax needs no note.
        page.route("**/v1/diagnose", lambda route: route.fulfill(json=answer | {
            "diagnosis": "CN", "decision": "most_probable"}))  # fmt: skip
        page.click("#submit")
        page.wait_for_function(
            "() => document.querySelector('#probabilities tr.top th').textContent.startsWith('CN')"
        )
        assert not page.locator("#decision").is_visible()
