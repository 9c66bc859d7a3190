"""An LLM judge of diagnostic rationales, Prometheus-style (Kim et al., 2024).

Absolute grading: for one criterion at a time, the judge reads the patient
description, the rationale with the diagnosis it concludes, and a 1-5 score rubric
written for this task, then writes "Feedback: ... [RESULT] n". On the vLLM backend
the final "[RESULT] n" is structured output (`answer_prefix` + `answer_choices`), so
every answer parses; an OpenAI-compatible endpoint is only asked for it in the prompt.

Pairwise grading ("which rationale is better, A or B") runs BOTH orderings of every
pair: a pair is a win only when the two orderings pick the same rationale, else a
tie, and the share of agreeing pairs is reported (position-bias control).
`radiag.evaluation.agreement.verbosity_bias` reports the other known bias: scores that
grow with length.

The judge is never told the patient's true label: it sees the description (the only
column read from the records) and the model's own diagnosis. Reference-free: the
rubric is the reference, since a reference rationale would itself be a model's.

Prompt texts are versioned data (`judge_prompts`, `rubrics/<version>.yaml`); every
judged row records the `prompt_version` that produced it. The engine is any `BatchEngine`:
the stage passes an `ActorEngine` (`judge_engine`), whose engines live in Ray actors.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from radiag.config import StrictModel
from radiag.evaluation.criteria import CRITERIA, Criterion
from radiag.evaluation.judge_prompts import (
    RESULT,
    SCORES,
    feedback_of,
    has_text,
    judge_messages,
    pairwise_messages,
    parse_choice,
    parse_score,
)
from radiag.teacher.engines import (
    BatchEngine,
    Completion,
    EngineConfig,
    Messages,
    SamplingConfig,
    VllmEngineConfig,
)


class JudgeConfig(StrictModel):
    """What the judge runs on and what it grades."""

    engine: EngineConfig = Field(
        default_factory=VllmEngineConfig,
        description="built in Ray actors, `replicas` of them (`judge_engine.ActorEngine`)",
    )
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
    prompt_version: Literal["v1"] = Field(
        "v1", description="the judge's texts: rubrics/<version>.yaml; recorded on every row"
    )

    @field_validator("criteria")
    @classmethod
    def _distinct(cls, value: list[Criterion]) -> list[Criterion]:
        if not value or len(set(value)) != len(value):
            raise ValueError("criteria must name at least one criterion, each once")
        return value


class Judge:
    """Grades with one engine, in order.

    Features and the config fields that control them: decoding (`sampling`), the criteria
    an item that names none is graded on (`criteria`), the prompt texts (`prompt_version`,
    recorded on every row with the engine's backend and model).

    Args:
        cfg: the judge config.
        engine: where the conversations go, all at once: an `ActorEngine` built from
            `cfg.engine` (it batches them over its actors), or a stand-in in tests.
    """

    def __init__(self, cfg: JudgeConfig, engine: BatchEngine) -> None:
        self.cfg = cfg
        self.engine = engine

    def _provenance(self) -> dict[str, Any]:
        return {
            "engine": self.engine.backend,
            "model_judge": self.engine.model,
            "prompt_version": self.cfg.prompt_version,
        }

    def _generate(
        self, conversations: list[Messages], choices: tuple[str, ...]
    ) -> list[Completion]:
        return self.engine.generate(
            conversations, self.cfg.sampling, answer_prefix=RESULT, answer_choices=list(choices)
        )

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
        usable = [i for i, (item, _) in enumerate(jobs) if _has_inputs(item)]
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


def _has_inputs(item: dict[str, Any]) -> bool:
    return has_text(item.get("description")) and has_text(item.get("rationale"))


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
    cfg: JudgeConfig, rows: pd.DataFrame, records: pd.DataFrame, engine: BatchEngine
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
    cfg: JudgeConfig, rows: pd.DataFrame, records: pd.DataFrame, engine: BatchEngine
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
            if not has_text(a["description"]):
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
