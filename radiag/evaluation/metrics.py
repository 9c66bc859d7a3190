"""Diagnosis metrics of one model against the test labels, and paired model comparisons.

Pure functions on pandas/numpy (no Ray). The rules every number follows:

- A model is scored on the labelled test patients it has a row for: `n` of them;
  `coverage` = n / number of labelled test patients.
- A row with an `error`, or with a null `diagnosis` (its answer did not parse), has no
  prediction. It counts as wrong and lands in the `unparsed` column of the confusion
  matrix; `errors` counts the first kind and `unparsed` the second (disjoint, as the
  stages count them).
- Probability metrics (one-vs-rest AUC, Hand & Till mAUC, ROC curves, ECE, reliability
  bins) need p_AD/p_MCI/p_CN on every scored row; otherwise they are NaN or empty (the
  teacher has no probabilities; a model with failed rows has them on some rows only).
- Bootstrap CIs resample subjects, not visits. A subject's visits (`patient_id` =
  "<source>-<RID>-<VISCODE>", subject = "<source>-<RID>": `subject_of`) are correlated,
  and resampling visits would treat them as independent evidence and give too narrow an
  interval. Each resample draws as many subjects as were scored, with replacement, and
  takes every scored visit of each draw (a cluster bootstrap).
- McNemar compares two models on paired patients: the patient_ids both models answered,
  each visit one pair. It is not clustered by subject.

`predictions` tables are those of `radiag.evaluation.predictions.load_model`: a
`patient_id` and a `diagnosis` column; `error` and the probability columns are optional.
`truth` is `test_labels`: patient_id -> AD / MCI / CN.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from radiag.cohort.schema import Label
from radiag.outputs import PROBABILITY_COLUMNS

CLASSES = tuple(str(label) for label in Label)  # ("AD", "MCI", "CN"): confusion rows, proba columns
UNPARSED = "unparsed"
PROBABILITIES = [PROBABILITY_COLUMNS[label] for label in Label]  # in CLASSES order
SCORES = ("accuracy", "balanced_accuracy", "macro_f1")  # the metrics with bootstrap CIs
MODEL_METRICS_COLUMNS = [
    "model", "n", "coverage", "unparsed", "errors",
    *[f"{score}{suffix}" for score in SCORES for suffix in ("", "_lo", "_hi")],
    "auc_ovr", "mauc", "ece",
]  # fmt: skip
PAIRED_COLUMNS = [
    "model_a", "model_b", "n", "both_right", "a_only", "b_only", "both_wrong", "p_value"
]  # fmt: skip
SMOKE_PATIENTS = 100
"""A model scored on fewer labelled test patients than this is a smoke test, not a result."""
_BOOT_CELLS = 2_000_000  # subject draws held at once: bounds bootstrap memory on big splits


@dataclass
class ModelEvaluation:
    """Everything the report shows for one model."""

    metrics: dict[str, Any]
    """One row of MODEL_METRICS_COLUMNS (NaN where not computable)."""
    per_class: pd.DataFrame
    """class, precision, recall, f1, support: one row per class in CLASSES order."""
    confusion: pd.DataFrame
    """Counts; index = true class (CLASSES), columns = predicted CLASSES + 'unparsed'."""
    roc: dict[str, tuple[np.ndarray, np.ndarray, float]] = field(default_factory=dict)
    """class -> (fpr, tpr, auc), one-vs-rest; only classes with both positives and negatives."""
    reliability: pd.DataFrame = field(default_factory=pd.DataFrame)
    """confidence, accuracy, count of each non-empty calibration bin; empty if no probabilities."""


def evaluate_model(
    name: str, predictions: pd.DataFrame, truth: pd.Series, n_boot: int = 1000, seed: int = 0
) -> ModelEvaluation:
    """Score one model on the labelled patients it covers (see the module docstring for the rules).

    accuracy = correct / n. balanced_accuracy = mean recall over the classes present among
    the scored patients. macro_f1 = mean F1 over those classes (F1 = 0 where precision and
    recall are 0; a class never predicted has precision 0). Both equal sklearn's
    `balanced_accuracy_score` / `f1_score(average="macro")` when all three classes occur.
    Each has a 95% percentile bootstrap CI (`_lo`, `_hi`): `n_boot` resamples of the scored
    subjects (with all their visits) with replacement, drawn with
    `numpy.random.default_rng(seed)`.

    Args:
        name (str): the model's name, copied into `metrics["model"]`.
        predictions (pd.DataFrame): the model's rows, one per patient_id.
        truth (pd.Series): patient_id -> label of the labelled test patients.
        n_boot (int): bootstrap resamples; 0 leaves the CIs NaN. Default: 1000.
        seed (int): seed of the resampling. Default: 0.

    Raises:
        ValueError: a repeated or malformed patient_id, or a diagnosis or label outside
            AD/MCI/CN.
    """
    scored = _scored(predictions, truth)
    n, labelled = len(scored), int(truth.notna().sum())
    per_subject = _subject_confusions(
        scored.index.map(subject_of).to_numpy(),
        _codes(scored["label"]),
        _codes(scored["predicted"]),
    )
    confusion = per_subject.sum(axis=0)
    point = {score: float(values[0]) for score, values in _scores(confusion[None]).items()}
    intervals = _bootstrap(per_subject, n_boot, seed)
    metrics: dict[str, Any] = {
        "model": name,
        "n": n,
        "coverage": n / labelled if labelled else math.nan,
        "unparsed": int(scored["unparsed"].sum()),
        "errors": int(scored["error"].sum()),
    }
    for score in SCORES:
        metrics[score] = point[score]
        metrics[f"{score}_lo"], metrics[f"{score}_hi"] = intervals[score]
    metrics |= {"auc_ovr": math.nan, "mauc": math.nan, "ece": math.nan}
    evaluation = ModelEvaluation(
        metrics={column: metrics[column] for column in MODEL_METRICS_COLUMNS},
        per_class=_per_class(scored),
        confusion=pd.DataFrame(
            confusion,
            index=pd.Index(CLASSES, name="true"),
            columns=pd.Index([*CLASSES, UNPARSED], name="predicted"),
        ),
    )
    if n and set(PROBABILITIES) <= set(scored.columns):
        # Rows that failed (e.g. no MRI for an MRI student) have no probabilities: the
        # probability metrics cover the other rows, as long as every one of them has them.
        has = scored[PROBABILITIES].notna().all(axis=1).to_numpy()
        if has.any() and has[~scored["error"].to_numpy(bool)].all():
            _add_probability_metrics(
                evaluation, scored.loc[has, "label"].to_numpy(), scored.loc[has, PROBABILITIES]
            )
    return evaluation


def paired_comparisons(predictions: dict[str, pd.DataFrame], truth: pd.Series) -> pd.DataFrame:
    """Every pair of models on the labelled patients both cover, with an exact McNemar test.

    One row per unordered pair (model_a before model_b in the dict's order): n patients,
    both_right / a_only (right only for a) / b_only / both_wrong, and
    p_value = mcnemar_exact(a_only, b_only). Failed and unparsed rows count as wrong.
    """
    correct = {
        name: (scored["predicted"] == scored["label"])
        for name, scored in ((name, _scored(frame, truth)) for name, frame in predictions.items())
    }
    rows = []
    for a, b in itertools.combinations(correct, 2):
        shared = correct[a].index.intersection(correct[b].index)
        right_a, right_b = correct[a][shared].to_numpy(bool), correct[b][shared].to_numpy(bool)
        a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
        rows.append(
            {
                "model_a": a,
                "model_b": b,
                "n": len(shared),
                "both_right": int((right_a & right_b).sum()),
                "a_only": a_only,
                "b_only": b_only,
                "both_wrong": int((~right_a & ~right_b).sum()),
                "p_value": mcnemar_exact(a_only, b_only),
            }
        )
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def paired_difference(
    a: pd.DataFrame, b: pd.DataFrame, truth: pd.Series, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Model `a` minus model `b` on the labelled patients both answered: balanced accuracy's
    difference with a 95% subject-bootstrap CI, and the exact McNemar test of the pairs.

    Each resample draws subjects (with all their shared visits) once for both models, so
    the interval is that of the paired difference, narrower than two separate CIs suggest.
    Returns n, difference, difference_lo, difference_hi, a_only, b_only, p_value.
    """
    scored_a, scored_b = _scored(a, truth), _scored(b, truth)
    shared = scored_a.index.intersection(scored_b.index)
    scored_a, scored_b = scored_a.loc[shared], scored_b.loc[shared]
    subjects = shared.map(subject_of).to_numpy()
    label = _codes(scored_a["label"])
    per_subject = [
        _subject_confusions(subjects, label, _codes(scored["predicted"]))
        for scored in (scored_a, scored_b)
    ]
    point = [
        _scores(confusions.sum(axis=0)[None])["balanced_accuracy"][0] for confusions in per_subject
    ]
    right_a = (scored_a["predicted"] == scored_a["label"]).to_numpy(bool)
    right_b = (scored_b["predicted"] == scored_b["label"]).to_numpy(bool)
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    lo = hi = math.nan
    if len(shared) and n_boot > 0:
        boot_a, boot_b = _resampled_scores(per_subject, n_boot, seed)
        difference = boot_a["balanced_accuracy"] - boot_b["balanced_accuracy"]
        lo, hi = (float(v) for v in np.nanpercentile(difference, [2.5, 97.5]))
    return {
        "n": len(shared),
        "difference": float(point[0] - point[1]) if len(shared) else math.nan,
        "difference_lo": lo,
        "difference_hi": hi,
        "a_only": a_only,
        "b_only": b_only,
        "p_value": mcnemar_exact(a_only, b_only),
    }


def smoke_reason(n: int, epochs: float | None = None) -> str:
    """Why a model's scores are a smoke test and not a result ("" for a result): fewer than
    SMOKE_PATIENTS labelled test patients, or a student trained for less than one epoch."""
    reasons = []
    if n < SMOKE_PATIENTS:
        reasons.append(f"{n} test patients (< {SMOKE_PATIENTS})")
    if epochs is not None and not math.isnan(epochs) and epochs < 1:
        reasons.append(f"{epochs:.2f} epochs (< 1)")
    return "; ".join(reasons)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value: the binomial test of the discordant pairs.

    p = min(1, 2 P(X <= min(a_only, b_only))) with X ~ Binomial(a_only + b_only, 1/2); only
    discordant pairs carry information, and with none the p-value is 1.
    Example: mcnemar_exact(10, 2) = 2 (1 + 12 + 66) / 2**12 = 0.0386.
    """
    from scipy.stats import binom  # scipy and scikit-learn load where a metric needs them

    discordant = a_only + b_only
    if discordant == 0:
        return 1.0
    return float(min(1.0, 2 * binom.cdf(min(a_only, b_only), discordant, 0.5)))


def hand_till_mauc(y_true: Any, proba: Any, classes: Any) -> float:
    """Hand & Till (2001) multi-class AUC: M = 2 / (c (c - 1)) * sum over pairs i < j of Â(i, j).

    Â(i, j) = (A(i|j) + A(j|i)) / 2, where A(i|j) is, among the patients of classes i and j
    only, the probability that a random class-i patient has a higher p_i than a random
    class-j patient (ties count 1/2: the Mann-Whitney statistic). Pairs where a class has no
    patient are left out of the mean; NaN if no pair is left. This is sklearn's
    `roc_auc_score(multi_class="ovo", average="macro")`.

    Args:
        y_true: the true class of each patient, (n,).
        proba: class probabilities, (n, c), columns in `classes` order.
        classes: the c class names.
    """
    y = np.asarray(y_true).astype(str)
    p = np.asarray(proba, dtype=float)
    names = [str(c) for c in classes]
    pairs = []
    for i, j in itertools.combinations(range(len(names)), 2):
        in_i, in_j = y == names[i], y == names[j]
        if in_i.any() and in_j.any():
            a_ij = _mann_whitney(p[in_i, i], p[in_j, i])
            a_ji = _mann_whitney(p[in_j, j], p[in_i, j])
            pairs.append((a_ij + a_ji) / 2)
    return float(np.mean(pairs)) if pairs else math.nan


def expected_calibration_error(
    y_true: Any, proba: Any, classes: Any, bins: int = 10
) -> tuple[float, pd.DataFrame]:
    """Top-label expected calibration error (Guo et al. 2017) and its reliability-diagram bins.

    confidence = max_k p_k, correct = (argmax_k p_k == true class). The confidences fall in
    `bins` equal-width bins ((0, 1/bins], ..., ((bins-1)/bins, 1]; 0 joins the first), and
    ECE = sum over bins b of (|B_b| / n) * |accuracy(B_b) - mean confidence(B_b)|.

    Returns:
        (ece, bins): ECE (NaN for no rows) and one row per non-empty bin with its mean
        `confidence`, its `accuracy` and its `count`.
    """
    y = np.asarray(y_true).astype(str)
    p = np.asarray(proba, dtype=float)
    if len(y) == 0:
        return math.nan, pd.DataFrame(columns=["confidence", "accuracy", "count"])
    confidence = p.max(axis=1)
    correct = np.asarray([str(c) for c in classes])[p.argmax(axis=1)] == y
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    count = np.bincount(index, minlength=bins)
    filled = count > 0
    mean_confidence = np.bincount(index, weights=confidence, minlength=bins)[filled] / count[filled]
    accuracy = np.bincount(index, weights=correct, minlength=bins)[filled] / count[filled]
    ece = float(np.sum(count[filled] * np.abs(accuracy - mean_confidence)) / len(y))
    reliability = pd.DataFrame(
        {"confidence": mean_confidence, "accuracy": accuracy, "count": count[filled]}
    )
    return ece, reliability


def _scored(predictions: pd.DataFrame, truth: pd.Series) -> pd.DataFrame:
    """The model's rows of labelled patients, by patient_id: label, predicted, error, unparsed.

    `predicted` is the diagnosis, or 'unparsed' for a row with an error or no diagnosis.
    Probability columns come along where the table has them.
    """
    repeated = predictions["patient_id"][predictions["patient_id"].duplicated()]
    if len(repeated):
        raise ValueError(f"patient_id repeated in predictions: {list(repeated[:5])}")
    labels = truth.dropna().astype(str)
    _check_values(labels, "label")
    rows = predictions[predictions["patient_id"].isin(labels.index)]
    rows = rows.set_index("patient_id").sort_index()
    diagnosis = rows["diagnosis"].astype(object).where(rows["diagnosis"].notna(), None)
    _check_values(diagnosis.dropna(), "diagnosis")
    error = rows["error"].notna() if "error" in rows else pd.Series(False, index=rows.index)
    usable = ~error & diagnosis.notna()
    scored = pd.DataFrame(
        {
            "label": labels.reindex(rows.index),
            "predicted": diagnosis.where(usable, UNPARSED).astype(str),
            "error": error.astype(bool),
            "unparsed": (~error & diagnosis.isna()).astype(bool),
        },
        index=rows.index,
    )
    present = [column for column in PROBABILITIES if column in rows]
    return scored.join(rows[present].astype(float)) if present else scored


def _check_values(values: pd.Series, what: str) -> None:
    unknown = values[~values.isin(CLASSES)]
    if len(unknown):
        raise ValueError(
            f"{what} outside {'/'.join(CLASSES)} for {len(unknown)} patients "
            f"(e.g. {dict(unknown.astype(str).head(5))})"
        )


def _codes(values: pd.Series) -> np.ndarray:
    """Class index per row: 0..2 in CLASSES order, 3 for 'unparsed'."""
    return pd.Categorical(values, categories=[*CLASSES, UNPARSED]).codes.astype(np.int64)


def _scores(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """SCORES of each confusion matrix in a (B, K, K + 1) stack, as (B,) arrays."""
    k = len(CLASSES)
    hits = np.diagonal(confusion[:, :, :k], axis1=1, axis2=2).astype(float)  # (B, K)
    support = confusion.sum(axis=2)  # (B, K): true patients per class
    predicted = confusion[:, :, :k].sum(axis=1)  # (B, K): predictions per class
    present = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(present, hits / support, 0.0)
        precision = np.where(predicted > 0, hits / predicted, 0.0)
        f1 = np.where(hits > 0, 2 * precision * recall / (precision + recall), 0.0)
        return {
            "accuracy": hits.sum(axis=1) / support.sum(axis=1),
            "balanced_accuracy": recall.sum(axis=1) / present.sum(axis=1),
            "macro_f1": np.where(present, f1, 0.0).sum(axis=1) / present.sum(axis=1),
        }


def subject_of(patient_id: str) -> str:
    """The subject of a visit: "<source>-<RID>" of patient_id "<source>-<RID>-<VISCODE>".

    A source name has no "-" (`radiag.cohort.mapping`) and the VISCODE is after the last
    one, so the RID is whatever lies between, even a negative one.

    Raises:
        ValueError: an id without both separators.
    """
    source, _, rest = str(patient_id).partition("-")
    rid, dash, _ = rest.rpartition("-")
    if not (source and rid and dash):
        raise ValueError(f"patient_id {patient_id!r} is not <source>-<RID>-<VISCODE>")
    return f"{source}-{rid}"


def _subject_confusions(subjects: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Confusion counts of each subject's visits: (S, K, K + 1), one matrix per subject."""
    _, unit = np.unique(subjects, return_inverse=True)
    k = len(CLASSES)
    cells = unit * k * (k + 1) + y_true * (k + 1) + y_pred
    size = unit.max(initial=-1) + 1
    return np.bincount(cells, minlength=size * k * (k + 1)).reshape(size, k, k + 1)


def _bootstrap(per_subject: np.ndarray, n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """95% percentile CIs (2.5th, 97.5th) of SCORES over subject resamples; NaN if none."""
    if len(per_subject) == 0 or n_boot <= 0:
        return {score: (math.nan, math.nan) for score in SCORES}
    (samples,) = _resampled_scores([per_subject], n_boot, seed)
    return {
        score: tuple(float(v) for v in np.percentile(values, [2.5, 97.5]))
        for score, values in samples.items()
    }


def _resampled_scores(
    per_subject: list[np.ndarray], n_boot: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """SCORES of `n_boot` subject resamples, each drawn once for every stack in
    `per_subject` (one (S, K, K + 1) stack per model, the same S subjects in each).

    A resample draws S of the S subjects with replacement: its confusion matrix is the sum
    of the drawn subjects' matrices, each times the number of times it was drawn. Draws are
    made in chunks of at most _BOOT_CELLS subject counts, which bounds memory.
    """
    size = len(per_subject[0])
    rng = np.random.default_rng(seed)
    flats = [stack.reshape(size, -1) for stack in per_subject]
    chunk = max(1, _BOOT_CELLS // size)
    samples: list[dict[str, list[np.ndarray]]] = [{s: [] for s in SCORES} for _ in per_subject]
    for start in range(0, n_boot, chunk):
        draws = rng.multinomial(size, np.full(size, 1 / size), size=min(chunk, n_boot - start))
        for stack, flat, scores in zip(per_subject, flats, samples, strict=True):
            confusion = (draws @ flat).reshape(-1, *stack.shape[1:])  # (B, K, K + 1)
            for score, values in _scores(confusion).items():
                scores[score].append(values)
    return [{s: np.concatenate(v) for s, v in scores.items()} for scores in samples]


def _per_class(scored: pd.DataFrame) -> pd.DataFrame:
    """sklearn's per-class precision / recall / F1 / support; unparsed rows are misses."""
    from sklearn.metrics import precision_recall_fscore_support

    if scored.empty:
        nan = [math.nan] * len(CLASSES)
        precision = recall = f1 = nan
        support = [0] * len(CLASSES)
    else:
        precision, recall, f1, support = precision_recall_fscore_support(
            scored["label"], scored["predicted"], labels=list(CLASSES), zero_division=0
        )
    return pd.DataFrame(
        {"class": CLASSES, "precision": precision, "recall": recall, "f1": f1, "support": support}
    )


def _add_probability_metrics(
    evaluation: ModelEvaluation, labels: np.ndarray, probabilities: pd.DataFrame
) -> None:
    """ROC curves, one-vs-rest AUC (mean over classes with a curve), mAUC, ECE, reliability."""
    from sklearn.metrics import roc_auc_score, roc_curve

    proba = probabilities.to_numpy(float)
    for i, name in enumerate(CLASSES):
        positive = labels == name
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, proba[:, i])
            evaluation.roc[name] = (fpr, tpr, float(roc_auc_score(positive, proba[:, i])))
    metrics = evaluation.metrics
    if evaluation.roc:
        metrics["auc_ovr"] = float(np.mean([auc for _, _, auc in evaluation.roc.values()]))
    metrics["mauc"] = hand_till_mauc(labels, proba, CLASSES)
    metrics["ece"], evaluation.reliability = expected_calibration_error(labels, proba, CLASSES)


def _mann_whitney(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a random `positive` score > a random `negative` one), ties 1/2."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))
    n_pos = len(positive)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * len(negative)))
