"""Prompts follow the paper, and no diagnosis prompt can carry the patient's label."""

from __future__ import annotations

import inspect
import re

import pytest

from radiag.cohort.schema import Label
from radiag.teacher.parsing import parse_answer
from radiag.teacher.prompts import (
    ANSWERS,
    QUESTION,
    TEMPLATES,
    Shot,
    diagnose_messages,
    rationalize_messages,
)

DESCRIPTION = "This patient is a 74-year-old female ... Also, based on their MRI scans:\n- Atrophy of hippocampus: Mild"
SHOTS = [
    Shot("desc a", "Low MMSE and severe atrophy.", Label.AD),
    Shot("desc b", "Mild memory decline.", Label.MCI),
    Shot("desc c", "Normal scores.", Label.CN),
]


@pytest.mark.parametrize("version", sorted(TEMPLATES))
def test_rationalize_shows_the_label_and_asks_for_the_final_line(version: str) -> None:
    system, user = rationalize_messages(DESCRIPTION, Label.MCI, version)
    assert system["role"] == "system" and user["role"] == "user"
    assert user["content"].startswith(DESCRIPTION)
    assert QUESTION in user["content"]
    assert "The correct diagnosis is (B) Mild Cognitive Impairment" in user["content"]
    assert user["content"].endswith('"Final Diagnosis: (B) Mild Cognitive Impairment".')


@pytest.mark.parametrize("version", sorted(TEMPLATES))
def test_diagnose_is_few_shot_exemplars_then_the_new_patient(version: str) -> None:
    messages = diagnose_messages(DESCRIPTION, SHOTS, version)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"] * 1 + [
        "user",
        "assistant",
    ] * 2 + ["user"]
    assert (
        messages[2]["content"]
        == "Low MMSE and severe atrophy.\nFinal Diagnosis: (A) Alzheimer's Disease"
    )
    assert messages[-1]["content"].startswith(DESCRIPTION)


@pytest.mark.parametrize("version", sorted(TEMPLATES))
def test_no_diagnosis_prompt_contains_the_patients_label(version: str) -> None:
    """The builder has no label parameter, and its text never names a correct answer."""
    assert "label" not in inspect.signature(diagnose_messages).parameters
    for shots in ([], SHOTS):
        query = diagnose_messages(DESCRIPTION, shots, version)[-1]["content"]
        assert "correct diagnosis" not in query.lower()
        # Every answer appears only as one of the three options of the question, never alone.
        assert not re.search(r"Final Diagnosis: \([ABC]\)", query)
        for answer in ANSWERS.values():
            assert query.count(answer.split(") ")[1]) == 1


@pytest.mark.parametrize(
    ("text", "finish", "diagnosis", "reason"),
    [
        (
            "Memory is impaired.\nFinal Diagnosis: (B) Mild Cognitive Impairment",
            "stop",
            Label.MCI,
            None,
        ),
        ("Final diagnosis: Alzheimer's disease", "stop", Label.AD, None),
        ("Final Diagnosis: **(C)** Normal Cognition", "stop", Label.CN, None),
        ("I think (A)... Final Diagnosis: (A)\nwait, Final Diagnosis: (C)", "stop", Label.CN, None),
        (
            "The patient probably has Alzheimer's disease.",
            "stop",
            None,
            "no 'Final Diagnosis: (X)' line",
        ),
        (
            "The patient probably",
            "length",
            None,
            "no 'Final Diagnosis: (X)' line (stopped at max_tokens)",
        ),
    ],
)
def test_the_answer_is_the_last_final_line_and_never_a_guess(
    text: str, finish: str, diagnosis: Label | None, reason: str | None
) -> None:
    parsed = parse_answer(text, finish)
    assert (parsed.diagnosis, parsed.reason) == (diagnosis, reason)
    assert "Final Diagnosis" not in parsed.rationale.split("\n")[-1] or diagnosis is None
