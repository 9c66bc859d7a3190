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
from typing import Literal

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
DIAGNOSE_ANSWER_ONLY = {
    "v1": (
        "{description}\n\n{question}\n\n"
        f'Answer with one line only, "{FINAL} (X) ..." where (X) is your answer.'
    ),
}
"""The diagnosis turn of each template version asking for the final line alone; a separate
table, so the chain-of-thought versions (and the identities of rows they made) stay as they were."""


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


Reasoning = Literal["chain_of_thought", "answer_only"]


def diagnose_messages(
    description: str,
    shots: Sequence[Shot],
    version: str = "v1",
    reasoning: Reasoning = "chain_of_thought",
) -> Messages:
    """Module II-1: k worked training examples, then the new patient with no label.

    `answer_only` asks for the final line alone, and its examples show only that line: the
    paper's comparison of chain-of-thought with a direct answer.
    """
    t = TEMPLATES[version]
    ask = t.diagnose if reasoning == "chain_of_thought" else DIAGNOSE_ANSWER_ONLY[version]
    messages = [{"role": "system", "content": t.system}]
    for shot in shots:
        worked = f"{shot.rationale.strip()}\n" if reasoning == "chain_of_thought" else ""
        messages.append(
            {"role": "user", "content": ask.format(description=shot.description, question=QUESTION)}
        )
        messages.append({"role": "assistant", "content": worked + answer_line(shot.label)})
    messages.append(
        {"role": "user", "content": ask.format(description=description, question=QUESTION)}
    )
    return messages
