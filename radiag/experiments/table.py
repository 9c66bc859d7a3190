"""The experiment's table: one row per model an arm made, scored on the shared test split,
and every row compared with the reference arm on the patients both answered.

Every number comes from the arms' prediction files and `arm.json` records; nothing is
carried over from a console or a config.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from radiag.evaluation.criteria import score_rationales
from radiag.evaluation.metrics import evaluate_model, paired_difference, smoke_reason
from radiag.evaluation.predictions import load_predictions, test_labels
from radiag.experiments.config import Arm, ExperimentsConfig
from radiag.experiments.runner import ARM_RECORD
from radiag.store import RunStore
from radiag.transfer import SHARED

TABLE_COLUMNS = [
    "name", "arm", "model", "kind", "n", "coverage",
    "balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi",
    "macro_f1", "macro_f1_lo", "macro_f1_hi", "mauc",
    "consistency", "specificity", "epochs", "wall_seconds", "tokens",
    "external_n", "external_balanced_accuracy", "external_balanced_accuracy_lo",
    "external_balanced_accuracy_hi", "smoke", "description",
]  # fmt: skip
COMPARISON_COLUMNS = [
    "name", "reference", "n", "difference", "difference_lo", "difference_hi",
    "a_only", "b_only", "p_value",
]  # fmt: skip


def experiment_tables(cfg: ExperimentsConfig) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(table, comparisons with the reference, problems): problems name arms that have no
    loadable predictions yet; their rows are missing, not zero."""
    shared = RunStore(cfg.shared_run().run_dir)
    truth = test_labels(shared)
    records = shared.read_table("splits/test.parquet").to_pandas().set_index("patient_id")
    rows, frames, problems = [], {}, []
    for arm in cfg.arms:
        store = RunStore(cfg.arm_run(arm).run_dir)
        if not store.exists(ARM_RECORD):
            problems.append(f"arm {arm.name} has not finished ({store.uri})")
            continue
        record = store.read_json(ARM_RECORD)
        models, unloadable = load_predictions(store)
        problems += unloadable
        external = _external_scores(cfg, arm)
        for model, frame in models.items():
            name = arm.name if len(models) == 1 else f"{arm.name}/{model}"
            frames[name] = frame
            evaluation = evaluate_model(name, frame, truth, n_boot=cfg.bootstrap).metrics
            rows.append(
                {
                    **evaluation,
                    "name": name,
                    "arm": arm.name,
                    "model": model,
                    "kind": arm.kind,
                    **_criteria(frame, records),
                    "epochs": _epochs(record),
                    "wall_seconds": record["wall_seconds"],
                    "tokens": _tokens(frame),
                    **external.get(model, {}),
                    "description": arm.description,
                }
            )
    table = pd.DataFrame(rows).reindex(columns=TABLE_COLUMNS)
    table["smoke"] = [smoke_reason(n, e) for n, e in zip(table["n"], table["epochs"], strict=True)]
    return table, _comparisons(cfg, frames, truth, table), problems


def _external_scores(cfg: ExperimentsConfig, arm: Arm) -> dict[str, dict[str, float]]:
    """model -> its n and balanced accuracy (95% CI) on the external cohort, where the arm's
    models diagnosed one (a baseline refitted on the shared features counts as itself)."""
    if cfg.external is None:
        return {}
    store = RunStore(cfg.external_dir(arm))
    if not store.exists("splits/test.parquet"):
        return {}  # not run yet: the columns stay empty
    truth = test_labels(store)
    models, _ = load_predictions(store)
    scores = {}
    for model, frame in models.items():
        metrics = evaluate_model(model, frame, truth, n_boot=cfg.bootstrap).metrics
        scores[model.removesuffix(SHARED)] = {
            f"external_{key}": metrics[key]
            for key in ("n", "balanced_accuracy", "balanced_accuracy_lo", "balanced_accuracy_hi")
        }
    return scores


def _criteria(frame: pd.DataFrame, records: pd.DataFrame) -> dict[str, float]:
    """Mean automatic consistency and specificity (1-5) of the arm's rationales; NaN for a
    model that writes none (a baseline, an answer-only teacher)."""
    rows = frame.assign(model="arm")[["patient_id", "model", "rationale", "diagnosis"]]
    rows = rows[rows["rationale"].fillna("").str.strip() != ""]
    if rows.empty:
        return {"consistency": math.nan, "specificity": math.nan}
    scores = score_rationales(rows, records).groupby("criterion")["score"].mean()
    return {c: float(scores.get(c, math.nan)) for c in ("consistency", "specificity")}


def _epochs(record: dict[str, Any]) -> float:
    """Epochs of the arm's student training (NaN for an arm that trains none)."""
    trained = [
        s["details"]["epochs"]
        for name, s in record["stages"].items()
        if name.startswith("distill-") and "epochs" in s["details"]
    ]
    return float(min(trained)) if trained else math.nan


def _tokens(frame: pd.DataFrame) -> float:
    """Prompt plus completion tokens of the arm's diagnoses (NaN for a baseline)."""
    used = frame.reindex(columns=["prompt_tokens", "completion_tokens"]).sum(axis=1, min_count=1)
    return float(used.sum()) if used.notna().any() else math.nan


def _comparisons(
    cfg: ExperimentsConfig, frames: dict[str, pd.DataFrame], truth: pd.Series, table: pd.DataFrame
) -> pd.DataFrame:
    """Every row minus the reference arm's (its first model when it made several)."""
    reference = next((n for n in table["name"] if n.split("/")[0] == cfg.reference), None)
    if reference is None:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    rows = [
        {
            "name": name,
            "reference": reference,
            **paired_difference(frame, frames[reference], truth, cfg.bootstrap),
        }
        for name, frame in frames.items()
        if name != reference
    ]
    return pd.DataFrame(rows).reindex(columns=COMPARISON_COLUMNS)
