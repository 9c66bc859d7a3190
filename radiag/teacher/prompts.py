"""Versioned prompt templates, after Kwon et al. (AAAI 2024).

Module I (rationalize): the teacher sees the description AND the true diagnosis and
explains the reasoning that leads there. Module II-1 (diagnose): the teacher sees k
exemplars (description, rationale, final diagnosis) from the training split and a
new description WITHOUT its label. `diagnose_messages` takes no label argument, so
nothing derived from the patient's label can reach a diagnosis prompt; a test checks
every template.

A change to any text here is a new version: add a template, never edit one in place,
because every generated row records the version that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from radiag.cohort.schema import Label
from radiag.teacher.engines import Messages

QUESTION = (
    "What is the diagnosis of this patient?\n"
    "(A) Alzheimer's Disease\n(B) Mild Cognitive Impairment\n(C) Normal Cognition"
)
ANSWERS = {
    Label.AD: "(A) Alzheimer's Disease",
    Label.MCI: "(B) Mild Cognitive Impairment",
    Label.CN: "(C) Normal Cognition",
}
FINAL = "Final Diagnosis:"


@dataclass(frozen=True)
class Template:
    """One version of the system prompt and the two user turns."""

    version: str
    system: str
    rationalize: str  # placeholders: {description}, {question}, {answer}
    diagnose: str  # placeholders: {description}, {question}


TEMPLATES = {
    "v1": Template(
        version="v1",
        system=(
            "You are an experienced neurologist. You explain clinical reasoning step by step, "
            "using only the patient's data and established medical knowledge."
        ),
        rationalize=(
            "{description}\n\n{question}\n\n"
            "The correct diagnosis is {answer}. Explain, step by step and using this patient's data, "
            "the clinical reasoning that leads to this diagnosis. "
            f'End with the line "{FINAL} {{answer}}".'
        ),
        diagnose=(
            "{description}\n\n{question}\n\n"
            "Reason step by step from this patient's data, then end with the line "
            f'"{FINAL} (X) ..." where (X) is your answer.'
        ),
    ),
}


@dataclass(frozen=True)
class Shot:
    """A worked example for few-shot diagnosis, always from the training split."""

    description: str
    rationale: str
    label: Label


def answer_line(label: Label) -> str:
    return f"{FINAL} {ANSWERS[label]}"


def rationalize_messages(description: str, label: Label, version: str = "v1") -> Messages:
    """Module I: the label is shown; the teacher explains it (training augmentation only)."""
    t = TEMPLATES[version]
    user = t.rationalize.format(description=description, question=QUESTION, answer=ANSWERS[label])
    return [{"role": "system", "content": t.system}, {"role": "user", "content": user}]


def diagnose_messages(description: str, shots: Sequence[Shot], version: str = "v1") -> Messages:
    """Module II-1: k worked training examples, then the new patient with no label."""
    t = TEMPLATES[version]
    messages = [{"role": "system", "content": t.system}]
    for shot in shots:
        messages.append(
            {
                "role": "user",
                "content": t.diagnose.format(description=shot.description, question=QUESTION),
            }
        )
        messages.append(
            {"role": "assistant", "content": f"{shot.rationale.strip()}\n{answer_line(shot.label)}"}
        )
    messages.append(
        {"role": "user", "content": t.diagnose.format(description=description, question=QUESTION)}
    )
    return messages
