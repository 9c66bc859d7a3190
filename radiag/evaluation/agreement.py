"""Agreement between score tables (judge, automatic measures, human raters) and the judge's
verbosity bias.

Score tables are long: model, patient_id, criterion, score. Statistics that are
undefined on the data (fewer than two points, a constant side) are NaN, never an error.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


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
