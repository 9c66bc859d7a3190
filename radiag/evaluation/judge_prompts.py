"""What the LLM judge reads and writes: versioned prompt texts, prompt builders, answer parsing.

The texts (Prometheus 2's system prompts and templates, and one 1-5 rubric per
criterion) are data: `rubrics/<version>.yaml`, loaded by `load_prompts`. A change to any
of them is a new file and a new `prompt_version`, because every judged row records the
version that produced it.

The builders take no label parameter: the judge sees the patient's description and the
model's own diagnosis, never the true label.
"""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from typing import Any

import yaml
from pydantic import field_validator

from radiag.cohort.schema import Label
from radiag.config import StrictModel
from radiag.evaluation.criteria import CRITERIA, Criterion
from radiag.teacher.engines import Messages
from radiag.teacher.prompts import ANSWERS, FINAL, QUESTION

SCORES = ("1", "2", "3", "4", "5")
RESULT = "[RESULT]"


class Rubric(StrictModel):
    """One criterion: the question the judge answers and what each score 1-5 means."""

    instruction: str
    scores: dict[int, str]

    @field_validator("scores")
    @classmethod
    def _five_levels(cls, value: dict[int, str]) -> dict[int, str]:
        if sorted(value) != [1, 2, 3, 4, 5] or not all(text.strip() for text in value.values()):
            raise ValueError("a rubric describes each score 1-5")
        return value


class JudgePrompts(StrictModel):
    """Every text of one prompt version; the templates are `str.format` templates."""

    version: str
    absolute_system: str
    relative_system: str
    absolute_template: str
    relative_template: str
    rubrics: dict[Criterion, Rubric]

    @field_validator("rubrics")
    @classmethod
    def _every_criterion(cls, value: dict[Criterion, Rubric]) -> dict[Criterion, Rubric]:
        if set(value) != set(CRITERIA):
            raise ValueError(f"rubrics must cover exactly {', '.join(CRITERIA)}")
        return value


@functools.cache
def load_prompts(version: str) -> JudgePrompts:
    """The judge's texts of `version`, from `rubrics/<version>.yaml` (package data).

    Raises:
        ValueError: the file names another version than its own name.
    """
    text = (files("radiag.evaluation") / "rubrics" / f"{version}.yaml").read_text("utf-8")
    prompts = JudgePrompts.model_validate(yaml.safe_load(text))
    if prompts.version != version:
        raise ValueError(f"rubrics/{version}.yaml says it is version {prompts.version!r}")
    return prompts


RUBRICS = load_prompts("v1").rubrics
"""The rubrics of the current version: the judge's default, and what human raters read."""


def diagnosis_text(diagnosis: str | None) -> str:
    """The model's diagnosis as the question's option ("(B) Mild Cognitive Impairment")."""
    if not has_text(diagnosis):
        return "(none given)"
    return ANSWERS[Label(diagnosis)] if diagnosis in set(Label) else diagnosis


def has_text(value: Any) -> bool:
    """True for a non-blank string (pandas gives None or NaN for a missing one)."""
    return isinstance(value, str) and bool(value.strip())


def _response(rationale: str, diagnosis: str | None) -> str:
    return f"{rationale.strip()}\n{FINAL} {diagnosis_text(diagnosis)}"


def _instruction(description: str) -> str:
    return f"{description.strip()}\n\n{QUESTION}"


def judge_messages(
    criterion: Criterion,
    description: str,
    rationale: str,
    diagnosis: str | None,
    version: str = "v1",
) -> Messages:
    """Absolute grading of one rationale on one criterion; there is no label parameter."""
    prompts = load_prompts(version)
    rubric = prompts.rubrics[criterion]
    user = prompts.absolute_template.format(
        instruction=_instruction(description),
        response=_response(rationale, diagnosis),
        rubric=rubric.instruction,
        score_lines="\n".join(f"Score {s}: {text}" for s, text in rubric.scores.items()),
    )
    return [
        {"role": "system", "content": prompts.absolute_system},
        {"role": "user", "content": user},
    ]


def pairwise_messages(
    criterion: Criterion,
    description: str,
    rationale_a: str,
    rationale_b: str,
    diagnosis_a: str | None = None,
    diagnosis_b: str | None = None,
    version: str = "v1",
) -> Messages:
    """Which of two rationales is better on one criterion; diagnoses are shown when given."""

    def response(rationale: str, diagnosis: str | None) -> str:
        return _response(rationale, diagnosis) if has_text(diagnosis) else rationale.strip()

    prompts = load_prompts(version)
    user = prompts.relative_template.format(
        instruction=_instruction(description),
        response_a=response(rationale_a, diagnosis_a),
        response_b=response(rationale_b, diagnosis_b),
        rubric=prompts.rubrics[criterion].instruction,
    )
    return [
        {"role": "system", "content": prompts.relative_system},
        {"role": "user", "content": user},
    ]


# The last "[RESULT] x"; brackets, case, a colon, markdown bold and a "/5" are tolerated.
_RESULT = re.compile(r"\[\s*result\s*\]\s*:?[\s*]*\(?\s*([0-9]+(?:\.[0-9]+)?|[AB])\b", re.I)


def _last_result(text: str) -> re.Match[str] | None:
    matches = list(_RESULT.finditer(text or ""))
    return matches[-1] if matches else None


def parse_score(text: str) -> int | None:
    """The integer 1-5 after the last "[RESULT]", or None (never guessed from other words)."""
    match = _last_result(text)
    if match is None or not match[1].isdigit():
        return None
    score = int(match[1])
    return score if 1 <= score <= 5 else None


def parse_choice(text: str) -> str | None:
    """The pick, "A" or "B", after the last "[RESULT]" of a pairwise answer, or None."""
    match = _last_result(text)
    return match[1].upper() if match and match[1].upper() in {"A", "B"} else None


def feedback_of(text: str) -> str:
    """The judge's feedback: the text before the last "[RESULT]", without "Feedback:"."""
    match = _last_result(text)
    head = text[: match.start()] if match else text or ""
    return re.sub(r"^\s*(###)?\s*feedback\s*:\s*", "", head, flags=re.I).strip()
