"""Model-free rationale criteria: the three of the paper's five that rules can decide.

Kwon et al. (AAAI 2024) rate rationales 1-5 on consistency, correctness,
specificity, helpfulness and human-likeness. Three are scored here by fixed rules,
the same for the teacher, every student and every baseline that writes a rationale:

consistency (`consistency`): contradictions with the patient record and with the
    model's own prediction. Record rules are those of the teacher's QC
    (`radiag.teacher.quality`, rules b-e): MCI called a form of AD, a stated MMSE
    off by more than 0.5, a stated APOE4 count or carrier status the record
    contradicts, an MRI finding opposite to its grade (no atrophy against Mild or
    Severe, severe atrophy against No); identical reasons count once. The argued
    class (rule a, `argued_class`) is compared with the class the model *predicts*,
    never with the true label. Score = 5 - (number of record contradictions) - 2 if
    the argued class differs from the prediction, floored at 1. No contradiction
    is 5; a rationale that argues nothing, or a row with no prediction, skips the
    class comparison. An empty (blank) rationale is 1.
specificity (`specificity`): the share of the patient's available findings that the
    rationale states correctly. Findings: age (`age_at_visit`, else `AGE`), sex
    (`PTGENDER`), MMSE, APOE4 and each MRI region graded Mild or Severe; a null
    record value is not available. A finding counts when the rationale states it
    and every statement of it agrees with the record (wrong statements earn
    nothing):
      age: "N-year-old", "N years old", "N years of age" or "aged N", within 1 year;
      sex: female/woman/lady/she/her(s/self) or male/man/gentleman/he/him/his(self),
           only words of the recorded sex;
      MMSE, APOE4: the QC rule (c, d) would flag the statement against some other
           record value (so the rationale commits to one) and does not flag it
           against the record;
      region: a finding phrase of QC rule e names the region (not in a hypothetical
           or general clause), none claims it absent, and a stated degree matches
           the grade: a severity word claims Severe, a milder degree word (mild,
           moderate, slight ...) claims Mild, no degree word fits either grade.
    fraction = counted / available -> 1 if 0 (or nothing available), 2 if < 0.25,
    3 if < 0.5, 4 if < 0.75, else 5.
helpfulness (`HelpfulnessReader`): how much the rationale helps a fixed reader reach
    the true label. The reader is two classifiers fitted once on training rows only
    (`fit` takes no other split): logistic regression (sklearn defaults, C=1) on TF-IDF
    of words (1-2-grams, sublinear tf); one reads the description and the rationale,
    each as its own L2-normalised TF-IDF block, and is fitted on every training row twice,
    with and without its rationale, so that a rationale it cannot read leaves the
    description's evidence as is (gain ~0); the other reads the description alone. gain =
    P(true label | description + rationale) - P(true label | description), mapped
    to 1 if gain <= -0.2, 2 if <= -0.05, 3 if < 0.05, 4 if < 0.2, else 5. An empty
    rationale is 1. TF-IDF rather than embeddings: fast and deterministic.

Correctness (are the medical statements true?) and human-likeness (does it read like
a clinician?) need medical knowledge and taste that no rule captures: they are left
to the LLM judge and the human raters. Consistency and specificity check a
rationale against the record it was written for, not against medicine, and
helpfulness measures use, not truth.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from radiag.cohort.describe import MRI_FINDINGS
from radiag.teacher.quality import (
    argued_class,
    check_apoe4,
    check_mmse,
    check_rationale,
    stated_findings,
)

if TYPE_CHECKING:  # scikit-learn loads where the helpfulness reader is fitted
    from sklearn.pipeline import Pipeline

Criterion = Literal["consistency", "correctness", "specificity", "helpfulness", "human_likeness"]
CRITERIA: tuple[Criterion, ...] = (
    "consistency", "correctness", "specificity", "helpfulness", "human_likeness",
)  # fmt: skip
"""The paper's five criteria, each scored 1-5."""
AUTOMATIC = ("consistency", "specificity", "helpfulness")
SCORE_COLUMNS = ("model", "patient_id", "criterion", "score", "source", "detail")

CLASS_PENALTY = 2
"""Consistency points lost when the argued class differs from the predicted one."""

_EMPTY = "empty rationale"
_NO_MMSE = -1.0  # no stated score (0-99) is within 0.5 of it: every statement is flagged
_AGE = re.compile(
    r"\b(\d{2,3})(?:[-\s]+years?[-\s]+old|\s+years\s+of\s+age)\b|\baged\s+(\d{2,3})\b", re.I
)
_SEX = {
    "Female": re.compile(r"\b(?:female|woman|lady|she|her|hers|herself)\b", re.I),
    "Male": re.compile(r"\b(?:male|man|gentleman|he|him|his|himself)\b", re.I),
}


def _missing(value: object) -> bool:
    """None, NaN, pd.NA or NaT."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


def _clean(record: Mapping) -> dict:
    """The record with every missing value as None (pandas rows carry NaN and pd.NA)."""
    return {key: None if _missing(value) else value for key, value in record.items()}


def _blank(text: object) -> bool:
    """Missing, or only whitespace."""
    return _missing(text) or not str(text).strip()


def _text(value: object) -> str:
    return "" if _missing(value) else str(value)


def consistency(
    rationale: str | None, record: Mapping, predicted: str | None
) -> tuple[int, list[str]]:
    """Score 1-5 and the contradictions found (module docstring: consistency).

    Args:
        rationale (str | None): the rationale text.
        record (Mapping): the patient record (MMSE, APOE4, grade_* columns).
        predicted (str | None): the class the model predicted; None skips the class rule.

    Returns:
        tuple[int, list[str]]: the score and one reason per contradiction.
    """
    if _blank(rationale):
        return 1, [_EMPTY]
    reasons = list(check_rationale(rationale, _clean(record), None).reasons)
    penalty = len(reasons)
    argued = argued_class(rationale)
    if not _missing(predicted) and argued is not None and argued != str(predicted):
        reasons.append(f"argues for {argued} but predicts {predicted}")
        penalty += CLASS_PENALTY
    return max(1, 5 - penalty), reasons


def _states_age(rationale: str, age: float) -> bool:
    stated = [float(a or b) for a, b in _AGE.findall(rationale)]
    return bool(stated) and all(abs(n - age) <= 1 for n in stated)


def _states_sex(rationale: str, sex: str) -> bool:
    said = {s for s, pattern in _SEX.items() if pattern.search(rationale)}
    return said == {sex}


def _states_mmse(rationale: str, mmse: float) -> bool:
    return bool(check_mmse(rationale, _NO_MMSE)) and not check_mmse(rationale, mmse)


def _states_apoe4(rationale: str, apoe4: float) -> bool:
    count = int(apoe4)
    committed = any(check_apoe4(rationale, other) for other in range(3) if other != count)
    return committed and not check_apoe4(rationale, count)


def _claimed_grades(rationale: str) -> dict[str, set[str]]:
    """Per grade column, the degrees QC's rule-e grammar reads: No, Mild, Severe or Stated."""
    claims: dict[str, set[str]] = {}
    for finding in stated_findings(rationale):
        claims.setdefault(finding.region, set()).add(finding.degree)
    return claims


def specificity(rationale: str | None, record: Mapping) -> tuple[int, dict]:
    """Score 1-5 and the findings available and stated (module docstring: specificity).

    Returns:
        tuple[int, dict]: the score and {"available": [...], "stated": [...]}, finding names.
    """
    record = _clean(record)
    age = (
        record.get("age_at_visit") if record.get("age_at_visit") is not None else record.get("AGE")
    )
    checks = {
        "age": (age, _states_age),
        "sex": (record.get("PTGENDER"), _states_sex),
        "MMSE": (record.get("MMSE"), _states_mmse),
        "APOE4": (record.get("APOE4"), _states_apoe4),
    }
    available = [name for name, (value, _) in checks.items() if value is not None]
    text = _text(rationale)
    stated = [name for name in available if checks[name][1](text, checks[name][0])]
    claims = _claimed_grades(text)
    for region, name in MRI_FINDINGS:
        grade = record.get(f"grade_{region}")
        if grade in ("Mild", "Severe"):
            available.append(name.lower())
            if claims.get(region) and claims[region] <= {"Stated", grade}:
                stated.append(name.lower())
    fraction = len(stated) / len(available) if available else 0.0
    return _specificity_bin(fraction), {"available": available, "stated": stated}


def _specificity_bin(fraction: float) -> int:
    if fraction == 0:
        return 1
    return 2 if fraction < 0.25 else 3 if fraction < 0.5 else 4 if fraction < 0.75 else 5


def _helpfulness_bin(gain: float) -> int:
    if gain <= -0.2:
        return 1
    if gain <= -0.05:
        return 2
    return 3 if gain < 0.05 else 4 if gain < 0.2 else 5


def _text_classifier(columns: tuple[str, ...]) -> Pipeline:
    """TF-IDF of each text column as its own block (each L2-normalised), then logistic regression.

    Separate blocks keep a short rationale from being diluted by a long description.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    tfidf = [(c, TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True), c) for c in columns]
    return Pipeline(
        [("tfidf", ColumnTransformer(tfidf)), ("logistic", LogisticRegression(max_iter=1000))]
    )


def _texts(descriptions: Sequence[str | None], rationales: Sequence[str | None]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "description": [_text(d) for d in descriptions],
            "rationale": [_text(r) for r in rationales],
        }
    )


@dataclass(frozen=True)
class HelpfulnessReader:
    """A fixed reader of rationales, fitted once on training rows (module docstring).

    Example:
        >>> reader = HelpfulnessReader.fit(train_descriptions, train_rationales, train_labels)
        >>> score, gain = reader.score(description, rationale, true_label)
    """

    with_rationale: Pipeline
    description_only: Pipeline

    @classmethod
    def fit(
        cls, descriptions: list[str], rationales: list[str], labels: list[str]
    ) -> HelpfulnessReader:
        """Fit both classifiers on training rows; no other split ever reaches them.

        Raises:
            ValueError: lengths differ, or fewer than two classes.
        """
        if not len(descriptions) == len(rationales) == len(labels):
            raise ValueError("descriptions, rationales and labels must have the same length")
        y = [str(label) for label in labels]
        if len(set(y)) < 2:
            raise ValueError("the reader needs training rows of at least two classes")
        texts = _texts(descriptions, rationales)
        # Each row also without its rationale: the joint classifier then falls back on the
        # description when a rationale says nothing it knows, so an empty one gains ~0.
        both = pd.concat([texts, texts.assign(rationale="")], ignore_index=True)
        return cls(
            with_rationale=_text_classifier(("description", "rationale")).fit(both, y + y),
            description_only=_text_classifier(("description",)).fit(texts, y),
        )

    def probabilities(
        self, descriptions: Sequence[str], rationales: Sequence[str], labels: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """P(label | description + rationale) and P(label | description), each (rows,).

        Raises:
            ValueError: a label the reader was not trained on.
        """
        classes = list(self.with_rationale.classes_)
        unknown = {str(label) for label in labels} - set(classes)
        if unknown:
            raise ValueError(f"labels not seen in training: {sorted(unknown)}")
        if not len(labels):
            return np.zeros(0), np.zeros(0)
        column = np.array([classes.index(str(label)) for label in labels])
        rows = np.arange(len(column))
        texts = _texts(descriptions, rationales)
        p_with = self.with_rationale.predict_proba(texts)
        p_without = self.description_only.predict_proba(texts)
        return p_with[rows, column], p_without[rows, column]  # both classifiers share classes_

    def score(self, description: str, rationale: str, label: str) -> tuple[int, float]:
        """Score 1-5 and the gain in P(true label); an empty rationale is (1, nan)."""
        if _blank(rationale):
            return 1, math.nan
        p_with, p_without = self.probabilities([description], [rationale], [label])
        gain = float(p_with[0] - p_without[0])
        return _helpfulness_bin(gain), gain


def score_rationales(
    rows: pd.DataFrame,
    records: pd.DataFrame,
    reader: HelpfulnessReader | None = None,
    truth: pd.Series | None = None,
) -> pd.DataFrame:
    """Score every rationale on the automatic criteria, as a long table.

    Args:
        rows (pd.DataFrame): patient_id, model, rationale, diagnosis (the prediction).
        records (pd.DataFrame): split rows indexed by patient_id (record columns, description).
        reader (HelpfulnessReader | None): fitted on training rows; None skips helpfulness.
            Default: None.
        truth (pd.Series | None): true label by patient_id; None skips helpfulness, and so
            does a null label. Default: None.

    Returns:
        pd.DataFrame: SCORE_COLUMNS, one row per (model, patient_id, criterion); score is
        1-5, source "automatic", detail the reasons or counts. Rows with a null rationale are
        not rationales and are skipped: the caller counts them (rows["rationale"].isna()).

    Raises:
        ValueError: a patient_id missing from records (or from truth, when given).
    """
    wanted = list(rows["patient_id"])
    needed = [records.index] + ([truth.index] if truth is not None and reader is not None else [])
    missing = sorted({p for index in needed for p in set(wanted) - set(index)})
    if missing:
        raise ValueError(f"{len(missing)} patient_ids have no record or label, e.g. {missing[:3]}")
    scored = rows[rows["rationale"].notna()]
    lookup = records.loc[scored["patient_id"].unique()].to_dict("index")
    out = []
    for model, pid, rationale, predicted in scored[
        ["model", "patient_id", "rationale", "diagnosis"]
    ].itertuples(index=False):
        record = lookup[pid]
        score, reasons = consistency(rationale, record, predicted)
        out.append((model, pid, "consistency", score, "; ".join(reasons) or "no contradiction"))
        score, found = specificity(rationale, record)
        detail = f"{len(found['stated'])}/{len(found['available'])} stated: " + ", ".join(
            found["stated"]
        )
        out.append((model, pid, "specificity", score, detail))
    if reader is not None and truth is not None:
        out.extend(_helpfulness_rows(scored, records, reader, truth))
    table = pd.DataFrame(out, columns=["model", "patient_id", "criterion", "score", "detail"])
    table.insert(4, "source", "automatic")
    table["score"] = table["score"].astype("int64")
    rank = table["criterion"].map({name: i for i, name in enumerate(AUTOMATIC)})
    table = table.assign(rank=rank).sort_values(["model", "patient_id", "rank"], kind="stable")
    return table.drop(columns="rank").reset_index(drop=True)[list(SCORE_COLUMNS)]


def _helpfulness_rows(
    scored: pd.DataFrame, records: pd.DataFrame, reader: HelpfulnessReader, truth: pd.Series
) -> list[tuple]:
    """One batched pass of the reader over every scored row with a true label."""
    labels = truth.loc[scored["patient_id"]].to_numpy(dtype=object)
    labelled = np.array([not _missing(label) for label in labels], dtype=bool)
    scored, labels = scored[labelled], labels[labelled]
    read = ~scored["rationale"].map(_blank).to_numpy(dtype=bool)
    descriptions = records.loc[scored["patient_id"], "description"].to_numpy(dtype=object)
    p_with, p_without = np.full(len(scored), np.nan), np.full(len(scored), np.nan)
    p_with[read], p_without[read] = reader.probabilities(
        list(descriptions[read]), list(scored["rationale"][read]), list(labels[read])
    )
    out = []
    for i, (model, pid) in enumerate(scored[["model", "patient_id"]].itertuples(index=False)):
        if not read[i]:
            out.append((model, pid, "helpfulness", 1, _EMPTY))
            continue
        gain = p_with[i] - p_without[i]
        detail = (
            f"gain {gain:+.3f} = P(true | description + rationale) {p_with[i]:.3f}"
            f" - P(true | description) {p_without[i]:.3f}"
        )
        out.append((model, pid, "helpfulness", _helpfulness_bin(gain), detail))
    return out
