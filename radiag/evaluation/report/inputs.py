"""What the report shows: one dataclass, built by `radiag.evaluation.stage.run_evaluate`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class ReportInputs:
    """Everything the report shows; `radiag.evaluation.stage.run_evaluate` builds it."""

    manifest: dict
    """The run's manifest.json: config, versions, seeds, git_commit, stages, python, ..."""
    cohort_summary: pd.DataFrame
    """One row per (split, group): n, age_mean, age_sd, female_pct, mmse_mean, mmse_sd,
    apoe4_carrier_pct."""
    cohort_distributions: pd.DataFrame
    """One row per visit: split, label, AGE, MMSE, hippocampus_icv."""
    metrics: pd.DataFrame
    """One row per model: `metrics.MODEL_METRICS_COLUMNS` (NaN where not computable)."""
    confusion: dict[str, pd.DataFrame]
    """model -> counts; index = true class, columns = predicted class + 'unparsed'."""
    roc: dict[str, dict[str, tuple[np.ndarray, np.ndarray, float]]]
    """model -> class -> (fpr, tpr, auc); models without probabilities are absent."""
    reliability: dict[str, pd.DataFrame]
    """model -> bins: confidence, accuracy, count."""
    paired: pd.DataFrame
    """McNemar per model pair: model_a, model_b, n, both_right, a_only, b_only, both_wrong,
    p_value."""
    criteria: pd.DataFrame
    """Long: model, criterion, source (automatic/judge/human), score (1-5), patient_id."""
    examples: list[dict]
    """Best and worst rationales: model, patient_id, kind, description, record, rationale,
    diagnosis, label, scores (criterion -> score)."""
    counts: dict[str, Any]
    """Named counts (int, or a dict of them): quarantine reasons, QC flags, unparsed, ..."""
    problems: list[str]
    """Inputs that could not be evaluated; shown in a banner at the top."""
    agreement: pd.DataFrame | None = None
    """Agreement between score sources: criterion, pair, n, spearman, kappa, ..."""
