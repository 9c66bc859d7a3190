"""An LLM judge of diagnostic rationales, Prometheus-style (Kim et al., 2024).

Absolute grading: for one criterion at a time, the judge reads the patient
description, the rationale with the diagnosis it concludes, and a 1-5 score rubric
written for this task, then writes "Feedback: ... [RESULT] n". On the vLLM backend
the final "[RESULT] n" is structured output (`answer_prefix` + `answer_choices`), so
every answer parses; an OpenAI-compatible endpoint is only asked for it in the prompt.

Pairwise grading ("which rationale is better, A or B") runs BOTH orderings of every
pair: a pair is a win only when the two orderings pick the same rationale, else a
tie, and the share of agreeing pairs is reported (position-bias control).
`verbosity_bias` reports the other known bias: scores that grow with length.

The judge is never told the patient's true label: it sees the description (the only
column read from the records) and the model's own diagnosis. Reference-free: the
rubric is the reference, since a reference rationale would itself be a model's.

A change to any text here (templates or RUBRICS) is a new `prompt_version`, because
every judged row records the version that produced it.
"""

from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from radiag.cohort.schema import Label
from radiag.config import StrictModel
from radiag.evaluation.criteria import CRITERIA, Criterion
from radiag.teacher.engines import (
    Completion,
    Engine,
    EngineConfig,
    Messages,
    SamplingConfig,
    VllmEngineConfig,
)
from radiag.teacher.prompts import ANSWERS, FINAL, QUESTION

SCORES = ("1", "2", "3", "4", "5")
RESULT = "[RESULT]"


class JudgeConfig(StrictModel):
    """What the judge runs on and what it grades."""

    engine: EngineConfig = Field(default_factory=VllmEngineConfig)
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.0, max_tokens=200),
        description="feedback tokens before the score; greedy by default",
    )
    criteria: list[Criterion] = Field(default_factory=lambda: list(CRITERIA))
    limit: int | None = Field(
        None, ge=1, description="rationales per model: the first N by patient_id"
    )
    pairwise: bool = Field(
        False,
        description="also compare every two models on their shared patients (compare_rationales)",
    )
    prompt_version: Literal["v1"] = "v1"

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, value: list[Criterion]) -> list[Criterion]:
        if not value or len(set(value)) != len(value):
            raise ValueError("criteria must name at least one criterion, each once")
        return value


@dataclass(frozen=True)
class Rubric:
    """One criterion: the question the judge answers and what each score 1-5 means."""

    instruction: str
    scores: dict[int, str]  # 1..5 -> description


RUBRICS: dict[Criterion, Rubric] = {
    "consistency": Rubric(
        "Is the rationale consistent with the patient's data and with the diagnosis it "
        "concludes? It must not misstate any fact of the record (age, education, MMSE, APOE4, "
        "MRI findings) nor argue for a different diagnosis than the one it gives.",
        {
            1: "Misstates the patient's data throughout, or argues for another diagnosis than the one it gives.",
            2: "Several statements contradict the record or the concluded diagnosis.",
            3: "Mostly consistent, with one clear contradiction or misquoted value.",
            4: "Consistent with the record and the conclusion; at most a minor imprecision.",
            5: "Every statement agrees with the record, and the reasoning leads to exactly the diagnosis given.",
        },
    ),
    "correctness": Rubric(
        "Is the medical knowledge in the rationale correct: MMSE ranges, the risk carried by "
        "APOE4, what atrophy of the hippocampus, entorhinal cortex or temporal lobe and "
        "ventricle enlargement indicate, and what separates normal cognition, mild cognitive "
        "impairment and Alzheimer's disease?",
        {
            1: "Serious medical errors that would mislead a clinician.",
            2: "Several incorrect or outdated medical claims.",
            3: "Mostly correct, with one error or a misleading oversimplification.",
            4: "Correct, with minor imprecisions.",
            5: "Entirely correct and in line with current clinical knowledge.",
        },
    ),
    "specificity": Rubric(
        "Does the rationale reason from this patient's own details (the specific scores, "
        "genotype and MRI findings of the record) rather than generic statements that would "
        "fit any patient?",
        {
            1: "Entirely generic; uses none of the patient's data.",
            2: "Mentions a detail or two but reasons generically.",
            3: "Uses some of the patient's details but omits important ones.",
            4: "Uses most of the relevant details and ties them to the conclusion.",
            5: "Grounds every step in the patient's data, including how the findings combine.",
        },
    ),
    "helpfulness": Rubric(
        "Would the rationale help a clinician reach the right diagnosis for this patient? "
        "Judge from the patient's data and your own medical knowledge whether it identifies "
        "the decisive findings and draws the right inference from them.",
        {
            1: "Misleading: it points away from the diagnosis the data support.",
            2: "Of little use: the key findings are missed or misread.",
            3: "Somewhat helpful: some key findings, but a weak or incomplete inference.",
            4: "Helpful: the key findings and a mostly sound inference.",
            5: "Very helpful: weighs the decisive findings against the alternatives and leads convincingly to the diagnosis the data support.",
        },
    ),
    "human_likeness": Rubric(
        "Does the rationale read like the note of an experienced clinician: fluent, coherent "
        "and well organised, without repetition, filler or artefacts of machine generation?",
        {
            1: "Incoherent, repetitive or garbled text.",
            2: "Understandable but awkward, repetitive or disorganised.",
            3: "Readable, with some unnatural phrasing or repetition.",
            4: "Fluent and natural, with minor stylistic issues.",
            5: "Indistinguishable from a well-written note by an experienced clinician.",
        },
    ),
}

# Prometheus 2's system prompts and task descriptions, without the reference answer.
ABSOLUTE_SYSTEM = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on a "
    "specific criteria, ensuring each assessment reflects the absolute standards set for "
    "performance."
)
RELATIVE_SYSTEM = (
    "You are a fair judge assistant assigned to deliver insightful feedback that compares "
    "individual performances, highlighting how each stands relative to others within the same "
    "cohort."
)
ABSOLUTE_TEMPLATES = {
    "v1": """###Task Description:
An instruction (a patient description and a diagnostic question), a response to evaluate (a clinical rationale and its diagnosis), and a score rubric representing an evaluation criterion are given.
1. Write a concise feedback that assesses the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing the feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.

###The instruction to evaluate:
{instruction}

###Response to evaluate:
{response}

###Score Rubrics:
[{rubric}]
{score_lines}

###Feedback: """
}
RELATIVE_TEMPLATES = {
    "v1": """###Task Description:
An instruction (a patient description and a diagnostic question), two responses to evaluate (clinical rationales, denoted as Response A and Response B), and an evaluation criterion are given.
1. Write a concise feedback that assesses the two responses strictly based on the given evaluation criterion, not evaluating in general.
2. Instead of examining Response A and Response B separately, go straight to the point and mention the commonalities and differences between them.
3. After writing the feedback, indicate the better response, either "A" or "B".
4. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (Either "A" or "B")"
5. Please do not generate any other opening, closing, and explanations.

###Instruction:
{instruction}

###Response A:
{response_a}

###Response B:
{response_b}

###Score Rubric:
{rubric}

###Feedback: """
}


def diagnosis_text(diagnosis: str | None) -> str:
    """The model's diagnosis as the question's option ("(B) Mild Cognitive Impairment")."""
    if not _text(diagnosis):
        return "(none given)"
    return ANSWERS[Label(diagnosis)] if diagnosis in set(Label) else diagnosis


def _text(value: Any) -> bool:
    """True for a non-blank string (pandas gives None or NaN for a missing one)."""
    return isinstance(value, str) and bool(value.strip())


def _response(rationale: str, diagnosis: str | None) -> str:
    return f"{rationale.strip()}\n{FINAL} {diagnosis_text(diagnosis)}"


def judge_messages(
    criterion: Criterion,
    description: str,
    rationale: str,
    diagnosis: str | None,
    version: str = "v1",
) -> Messages:
    """Absolute grading of one rationale on one criterion; there is no label parameter."""
    rubric = RUBRICS[criterion]
    user = ABSOLUTE_TEMPLATES[version].format(
        instruction=f"{description.strip()}\n\n{QUESTION}",
        response=_response(rationale, diagnosis),
        rubric=rubric.instruction,
        score_lines="\n".join(f"Score {s}: {text}" for s, text in rubric.scores.items()),
    )
    return [{"role": "system", "content": ABSOLUTE_SYSTEM}, {"role": "user", "content": user}]


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
        return _response(rationale, diagnosis) if _text(diagnosis) else rationale.strip()

    user = RELATIVE_TEMPLATES[version].format(
        instruction=f"{description.strip()}\n\n{QUESTION}",
        response_a=response(rationale_a, diagnosis_a),
        response_b=response(rationale_b, diagnosis_b),
        rubric=RUBRICS[criterion].instruction,
    )
    return [{"role": "system", "content": RELATIVE_SYSTEM}, {"role": "user", "content": user}]


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


class Judge:
    """Holds one engine and grades with it, in order.

    Features and the config fields that control them: the backend and model (`engine`;
    conversations go to it `engine.batch_size` at a time), decoding (`sampling`), the
    criteria an item that names none is graded on (`criteria`), the prompt templates
    (`prompt_version`, recorded on every row with the engine and the judge model).

    Args:
        cfg: the judge config.
        engine: an already built engine (tests, a caller that shares one); default:
            `build_engine(cfg.engine)`.
    """

    def __init__(self, cfg: JudgeConfig, engine: Engine | None = None) -> None:
        from radiag.teacher.stages import build_engine

        self.cfg = cfg
        self.engine = engine if engine is not None else build_engine(cfg.engine)

    def _provenance(self) -> dict[str, Any]:
        return {
            "engine": self.engine.backend,
            "model_judge": self.engine.model,
            "prompt_version": self.cfg.prompt_version,
        }

    def _generate(
        self, conversations: list[Messages], choices: tuple[str, ...]
    ) -> list[Completion]:
        step = self.cfg.engine.batch_size
        completions = []
        for start in range(0, len(conversations), step):
            completions += self.engine.generate(
                conversations[start : start + step],
                self.cfg.sampling,
                answer_prefix=RESULT,
                answer_choices=list(choices),
            )
        return completions

    def grade(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Absolute 1-5 scores, one row per (item, criterion).

        Args:
            items: dicts with model, patient_id, description, rationale, diagnosis and
                optionally criterion (without it: every criterion of the config).

        Returns:
            Rows with model, patient_id, criterion, score (1-5 or None), feedback,
            parse_error, error (engine error or missing input), engine, model_judge,
            prompt_version. An item without description or rationale is not sent.
        """
        jobs = [
            (item, criterion)
            for item in items
            for criterion in ([item["criterion"]] if item.get("criterion") else self.cfg.criteria)
        ]
        usable = [i for i, (item, _) in enumerate(jobs) if _has_text(item)]
        conversations = [
            judge_messages(
                c, item["description"], item["rationale"], item.get("diagnosis"),
                self.cfg.prompt_version,
            )
            for item, c in (jobs[i] for i in usable)
        ]  # fmt: skip
        done = dict(zip(usable, self._generate(conversations, SCORES), strict=True))
        rows = []
        for i, (item, criterion) in enumerate(jobs):
            completion = done.get(i)
            text = completion.text if completion and completion.error is None else None
            score = parse_score(text) if text is not None else None
            rows.append(
                {
                    "model": item["model"],
                    "patient_id": item["patient_id"],
                    "criterion": criterion,
                    "score": score,
                    "feedback": feedback_of(text) if text is not None else None,
                    "parse_error": _UNPARSED_SCORE if text is not None and score is None else None,
                    "error": completion.error if completion else "missing description or rationale",
                }
                | self._provenance()
            )
        return rows

    def compare(self, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pairwise judgements, each pair in both orderings (position-bias control).

        Args:
            pairs: dicts with patient_id, criterion, description, model_a, rationale_a,
                model_b, rationale_b, and optionally diagnosis_a, diagnosis_b.

        Returns:
            One row per pair: patient_id, criterion, model_a, model_b, choice_ab (the
            judge's pick, "A" or "B", with a's rationale shown first), choice_ba (b's shown
            first), winner (model_a or model_b when both orderings pick the same rationale,
            else "tie"), consistent (they did), feedback_ab, feedback_ba, parse_error,
            error, engine, model_judge, prompt_version.
        """
        a, b = ("rationale_a", "diagnosis_a"), ("rationale_b", "diagnosis_b")
        conversations = [
            pairwise_messages(
                p["criterion"], p["description"], p[first[0]], p[second[0]],
                p.get(first[1]), p.get(second[1]), self.cfg.prompt_version,
            )
            for p in pairs
            for first, second in ((a, b), (b, a))
        ]  # fmt: skip
        completions = self._generate(conversations, ("A", "B"))
        rows = []
        for p, ab, ba in zip(pairs, completions[0::2], completions[1::2], strict=True):
            choice_ab, choice_ba = _choice(ab), _choice(ba)
            # The rationale each ordering picked: with b shown first, "A" is model_b's.
            pick_ab = {"A": p["model_a"], "B": p["model_b"]}.get(choice_ab)
            pick_ba = {"A": p["model_b"], "B": p["model_a"]}.get(choice_ba)
            consistent = pick_ab is not None and pick_ab == pick_ba
            unparsed = any(c.error is None and _choice(c) is None for c in (ab, ba))
            rows.append(
                {key: p[key] for key in ("patient_id", "criterion", "model_a", "model_b")}
                | {
                    "choice_ab": choice_ab,
                    "choice_ba": choice_ba,
                    "winner": pick_ab if consistent else "tie",
                    "consistent": consistent,
                    "feedback_ab": feedback_of(ab.text) if ab.error is None else None,
                    "feedback_ba": feedback_of(ba.text) if ba.error is None else None,
                    "parse_error": "no '[RESULT] A|B' in an answer" if unparsed else None,
                    "error": ab.error or ba.error,
                }
                | self._provenance()
            )
        return rows


_UNPARSED_SCORE = "no '[RESULT] n' (n = 1-5) in the answer"


def _choice(completion: Completion) -> str | None:
    return parse_choice(completion.text) if completion.error is None else None


def _has_text(item: dict[str, Any]) -> bool:
    return _text(item.get("description")) and _text(item.get("rationale"))


def rating_items(
    rows: pd.DataFrame, records: pd.DataFrame, limit: int | None = None
) -> pd.DataFrame:
    """Rationales joined with their patient descriptions: what a judge or a rater sees.

    Args:
        rows: model outputs (OUTPUT_SCHEMA columns) with `model` naming the system rated
            (the `<model>` of `predictions/<model>/`); rows without a rationale or with an
            error are dropped.
        records: the split table; only patient_id and description are read (never a label).
        limit: per model, the first N rationales by patient_id.

    Returns:
        model, patient_id, description, rationale, diagnosis; sorted by model, patient_id.
    """
    usable = rows["rationale"].fillna("").str.strip().astype(bool)
    if "error" in rows:
        usable &= rows["error"].isna()
    items = rows.loc[usable, ["model", "patient_id", "rationale", "diagnosis"]]
    items = items.sort_values(["model", "patient_id"])
    if limit is not None:
        items = items.groupby("model", sort=False).head(limit)
    described = records[["patient_id", "description"]]
    items = items.merge(described, on="patient_id", how="left", validate="many_to_one")
    return items[["model", "patient_id", "description", "rationale", "diagnosis"]].reset_index(
        drop=True
    )


def judge_rationales(
    cfg: JudgeConfig, rows: pd.DataFrame, records: pd.DataFrame, engine: Engine | None = None
) -> pd.DataFrame:
    """Grade every rationale on every configured criterion (absolute grading).

    Returns:
        A long score table: model, patient_id, criterion, score (Int64, null when the
        judge failed), source="judge", feedback, parse_error, error, engine, model_judge,
        prompt_version.
    """
    items = rating_items(rows, records, cfg.limit).to_dict("records")
    out = pd.DataFrame(Judge(cfg, engine).grade(items), columns=_GRADE_COLUMNS)
    out["score"] = out["score"].astype("Int64")
    out.insert(4, "source", "judge")
    return out


_GRADE_COLUMNS = [
    "model", "patient_id", "criterion", "score", "feedback", "parse_error", "error", "engine",
    "model_judge", "prompt_version",
]  # fmt: skip


def compare_rationales(
    cfg: JudgeConfig, rows: pd.DataFrame, records: pd.DataFrame, engine: Engine | None = None
) -> pd.DataFrame:
    """Pairwise judgements between every two models on the patients both explained.

    Returns:
        `Judge.compare` rows (both orderings per pair); summarise with `pairwise_summary`.
    """
    items = rating_items(rows, records).set_index(["model", "patient_id"]).sort_index()
    models = sorted(items.index.get_level_values("model").unique())
    pairs = []
    for model_a, model_b in itertools.combinations(models, 2):
        shared = items.loc[model_a].index.intersection(items.loc[model_b].index).sort_values()
        for patient_id in shared[: cfg.limit]:
            a, b = items.loc[(model_a, patient_id)], items.loc[(model_b, patient_id)]
            if not _text(a["description"]):
                continue
            pairs += [
                {"patient_id": patient_id, "criterion": criterion, "description": a["description"],
                 "model_a": model_a, "rationale_a": a["rationale"], "diagnosis_a": a["diagnosis"],
                 "model_b": model_b, "rationale_b": b["rationale"], "diagnosis_b": b["diagnosis"]}
                for criterion in cfg.criteria
            ]  # fmt: skip
    return pd.DataFrame(Judge(cfg, engine).compare(pairs), columns=_COMPARE_COLUMNS)


_COMPARE_COLUMNS = [
    "patient_id", "criterion", "model_a", "model_b", "choice_ab", "choice_ba", "winner",
    "consistent", "feedback_ab", "feedback_ba", "parse_error", "error", "engine", "model_judge",
    "prompt_version",
]  # fmt: skip


def pairwise_summary(results: pd.DataFrame) -> pd.DataFrame:
    """Per (criterion, model_a, model_b): n, wins_a, wins_b, ties, position_consistency
    (share of pairs whose two orderings parsed and agreed) and first_position_rate (share of
    parsed single judgements that picked whichever rationale was shown first; 0.5 = unbiased).
    """

    def summarise(group: pd.DataFrame) -> pd.Series:
        choices = pd.concat([group["choice_ab"], group["choice_ba"]]).dropna()
        model_a, model_b = group.name[1], group.name[2]
        return pd.Series(
            {
                "n": len(group),
                "wins_a": int((group["winner"] == model_a).sum()),
                "wins_b": int((group["winner"] == model_b).sum()),
                "ties": int((group["winner"] == "tie").sum()),
                "position_consistency": float(group["consistent"].mean()),
                "first_position_rate": float((choices == "A").mean()) if len(choices) else np.nan,
            }
        )

    keys = ["criterion", "model_a", "model_b"]
    if results.empty:
        columns = ["n", "wins_a", "wins_b", "ties", "position_consistency", "first_position_rate"]
        return pd.DataFrame(columns=keys + columns)
    return results.groupby(keys).apply(summarise, include_groups=False).reset_index()


def verbosity_bias(scores: pd.DataFrame, rationales: pd.DataFrame) -> float:
    """Spearman correlation between a rationale's length (words) and its mean judge score
    over criteria; near 0 means the judge does not reward length. NaN if undefined.

    Args:
        scores: long score table (model, patient_id, criterion, score).
        rationales: model, patient_id, rationale.
    """
    mean = scores.dropna(subset=["score"]).groupby(["model", "patient_id"])["score"].mean()
    lengths = rationales.set_index(["model", "patient_id"])["rationale"].fillna("").str.split()
    joined = pd.concat(
        [mean.astype(float), lengths.str.len().rename("words")], axis=1, join="inner"
    )
    return _spearman(joined["score"].to_numpy(), joined["words"].to_numpy(dtype=float))


def agreement(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Agreement between two long score tables on matching (model, patient_id, criterion).

    Several scores per key in one table (several raters) are averaged first. Kappa and
    exact agreement compare scores rounded half up to integers, and are NaN unless both
    sides lie within 1-5 (an automatic metric on another scale gets Spearman only).

    Returns:
        Per criterion: n, spearman, kappa_quadratic, exact_agreement.
    """
    key = ["model", "patient_id", "criterion"]

    def mean_scores(table: pd.DataFrame) -> pd.Series:
        table = table.dropna(subset=["score"])
        return table.groupby(key)["score"].mean().astype(float)

    joined = pd.concat([mean_scores(a).rename("a"), mean_scores(b).rename("b")], axis=1).dropna()
    rows = []
    for criterion, group in joined.groupby(level="criterion", sort=True):
        x, y = group["a"].to_numpy(), group["b"].to_numpy()
        rx, ry = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
        on_scale = bool(((rx >= 1) & (rx <= 5) & (ry >= 1) & (ry <= 5)).all())
        rows.append(
            {
                "criterion": criterion,
                "n": len(group),
                "spearman": _spearman(x, y),
                "kappa_quadratic": quadratic_kappa(rx, ry) if on_scale else np.nan,
                "exact_agreement": float((rx == ry).mean()) if on_scale else np.nan,
            }
        )
    return pd.DataFrame(rows, columns=_AGREEMENT_COLUMNS)


_AGREEMENT_COLUMNS = ["criterion", "n", "spearman", "kappa_quadratic", "exact_agreement"]


def quadratic_kappa(x: np.ndarray, y: np.ndarray) -> float:
    """Cohen's kappa with quadratic weights on the 1-5 scale; NaN when undefined (e.g. both
    raters gave one and the same score throughout)."""
    from sklearn.metrics import cohen_kappa_score

    if len(x) == 0:
        return np.nan
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(cohen_kappa_score(x, y, labels=[1, 2, 3, 4, 5], weights="quadratic"))


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho; NaN with fewer than 2 points or a constant side."""
    from scipy.stats import spearmanr

    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    return float(spearmanr(x, y).statistic)
