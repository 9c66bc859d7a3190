"""Reading the final answer out of a generated text, without guessing.

The answer is the last "Final Diagnosis: (X) ..." line (the letter, or the option's
name when the letter is missing). Anything else is unparsed: the row keeps
`diagnosis = None` and a reason, and is counted; it is never guessed from words
elsewhere in the rationale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from radiag.cohort.schema import Label

_FINAL = re.compile(
    r"final\s+diagnosis\s*:?\s*\**\s*(?:\(?\s*(?P<letter>[ABC])\s*\)|(?P<name>alzheimer'?s\s+disease|"
    r"mild\s+cognitive\s+impairment|normal\s+cognition))",
    re.IGNORECASE,
)
_LETTERS = {"A": Label.AD, "B": Label.MCI, "C": Label.CN}
_NAMES = {"alzheimer": Label.AD, "mild": Label.MCI, "normal": Label.CN}


@dataclass(frozen=True)
class ParsedAnswer:
    rationale: str
    diagnosis: Label | None
    reason: str | None  # why diagnosis is None


def parse_answer(text: str, finish_reason: str | None = None) -> ParsedAnswer:
    """Split a completion into rationale and final diagnosis."""
    matches = list(_FINAL.finditer(text))
    if not matches:
        reason = "no 'Final Diagnosis: (X)' line"
        if finish_reason == "length":
            reason += " (stopped at max_tokens)"
        return ParsedAnswer(text.strip(), None, reason)
    last = matches[-1]
    if last["letter"]:
        label = _LETTERS[last["letter"].upper()]
    else:
        label = _NAMES[last["name"].split()[0].lower().rstrip("'s")]
    return ParsedAnswer(text[: last.start()].strip(), label, None)
