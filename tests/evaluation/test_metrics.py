"""Diagnosis metrics: known answers on hand-built tables, and agreement with sklearn."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest
from sklearn.metrics import (
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from radiag.evaluation.metrics import (
    CLASSES,
    MODEL_METRICS_COLUMNS,
    evaluate_model,
    expected_calibration_error,
    hand_till_mauc,
    mcnemar_exact,
    paired_comparisons,
    subject_of,
)

PROBABILITIES = ["p_AD", "p_MCI", "p_CN"]


def truth_of(labels: list[str], subjects: list[int] | None = None) -> pd.Series:
    """Labels by patient_id; one visit per subject unless `subjects` gives each visit's RID."""
    rids = subjects if subjects is not None else range(len(labels))
    ids = [f"adni-{rid:04d}-v{i:04d}" for i, rid in enumerate(rids)]
    return pd.Series(labels, index=pd.Index(ids, name="patient_id"), name="label")


def predictions_of(
    truth: pd.Series, diagnoses: list[str | None], proba: np.ndarray | None = None
) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"patient_id": truth.index[: len(diagnoses)], "diagnosis": diagnoses, "error": None}
    )
    if proba is not None:
        frame[PROBABILITIES] = proba
    return frame


def random_case(n: int, seed: int) -> tuple[pd.Series, pd.DataFrame, np.ndarray]:
    """Labels, argmax predictions and Dirichlet probabilities that carry some signal."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(CLASSES, size=n)
    proba = rng.dirichlet([1, 1, 1], size=n)
    proba[np.arange(n), pd.Index(CLASSES).get_indexer(labels)] += rng.uniform(0, 0.6, n)
    proba /= proba.sum(axis=1, keepdims=True)
    truth = truth_of(list(labels))
    diagnoses = [CLASSES[k] for k in proba.argmax(axis=1)]
    return truth, predictions_of(truth, diagnoses, proba), proba


def test_a_perfect_model_scores_one_everywhere() -> None:
    truth = truth_of(["AD", "MCI", "CN"] * 4)
    proba = np.eye(3)[pd.Index(CLASSES).get_indexer(truth)]
    result = evaluate_model("perfect", predictions_of(truth, list(truth), proba), truth)

    assert list(result.metrics) == MODEL_METRICS_COLUMNS
    m = result.metrics
    assert (m["model"], m["n"], m["coverage"], m["unparsed"], m["errors"]) == (
        "perfect",
        12,
        1,
        0,
        0,
    )
    for score in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert m[score] == m[f"{score}_lo"] == m[f"{score}_hi"] == 1
    assert m["auc_ovr"] == m["mauc"] == 1 and m["ece"] == pytest.approx(0)
    assert np.array_equal(result.confusion.to_numpy(), np.c_[4 * np.eye(3, dtype=int), [0, 0, 0]])
    assert list(result.confusion.index) == list(CLASSES)
    assert list(result.confusion.columns) == [*CLASSES, "unparsed"]
    assert result.per_class[["precision", "recall", "f1"]].to_numpy().min() == 1
    assert list(result.per_class["support"]) == [4, 4, 4]
    assert set(result.roc) == set(CLASSES)


def test_an_all_one_class_model_has_balanced_accuracy_one_third() -> None:
    truth = truth_of(["AD"] * 2 + ["MCI"] * 6 + ["CN"] * 4)
    result = evaluate_model("mci-only", predictions_of(truth, ["MCI"] * 12), truth)

    m = result.metrics
    assert m["accuracy"] == pytest.approx(6 / 12)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3)
    # F1(MCI) = 2 * (1/2 * 1) / (1/2 + 1) = 2/3; AD and CN are never predicted: F1 = 0.
    assert m["macro_f1"] == pytest.approx(2 / 9)
    assert m["macro_f1"] == pytest.approx(f1_score(truth, ["MCI"] * 12, average="macro"))
    assert list(result.confusion["MCI"]) == [2, 6, 4]
    assert math.isnan(m["auc_ovr"]) and math.isnan(m["mauc"]) and math.isnan(m["ece"])
    assert result.roc == {} and result.reliability.empty


def test_unparsed_and_failed_rows_count_as_wrong_and_are_reported() -> None:
    truth = truth_of(["AD", "MCI", "CN", "AD", "MCI", "CN", "AD", "MCI", "CN", "AD", "CN", "MCI"])
    diagnoses: list[str | None] = list(truth[:10])
    diagnoses[0] = diagnoses[4] = None  # unparsed
    predictions = predictions_of(truth, diagnoses)
    predictions.loc[7, "error"] = "engine timeout"  # its diagnosis does not count
    unlabelled = pd.DataFrame({"patient_id": ["X-unlabelled"], "diagnosis": ["AD"], "error": None})
    predictions = pd.concat([predictions, unlabelled], ignore_index=True)

    result = evaluate_model("partial", predictions, truth)

    m = result.metrics
    assert (m["n"], m["unparsed"], m["errors"]) == (10, 2, 1)
    assert m["coverage"] == pytest.approx(10 / 12)
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert result.confusion["unparsed"].sum() == 3
    assert result.confusion.loc["AD", "unparsed"] == 1
    assert result.confusion.loc["MCI", "unparsed"] == 2
    assert result.confusion.to_numpy().sum() == 10


def test_scores_agree_with_sklearn_on_random_data() -> None:
    truth, predictions, _ = random_case(200, seed=3)
    predictions.loc[:9, "diagnosis"] = None  # unparsed rows are misses for sklearn too
    predicted = predictions["diagnosis"].fillna("unparsed")

    result = evaluate_model("random", predictions, truth, n_boot=50)

    assert result.metrics["accuracy"] == pytest.approx(np.mean(predicted == truth.to_numpy()))
    labels = list(CLASSES)
    assert result.metrics["macro_f1"] == pytest.approx(
        f1_score(truth, predicted, labels=labels, average="macro")
    )
    recall = precision_recall_fscore_support(truth, predicted, labels=labels)[1]
    assert result.metrics["balanced_accuracy"] == pytest.approx(recall.mean())
    expected = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    assert np.allclose(result.per_class[["precision", "recall", "f1", "support"]].T, expected)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hand_till_mauc_is_sklearns_one_vs_one_macro_auc(seed: int) -> None:
    truth, predictions, proba = random_case(150, seed)
    proba[:10], proba[10:20] = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]  # ties count one half
    order = np.argsort(CLASSES)  # sklearn wants its labels sorted: AD, CN, MCI

    expected = roc_auc_score(truth, proba[:, order], multi_class="ovo", average="macro")

    assert hand_till_mauc(truth.to_numpy(), proba, CLASSES) == pytest.approx(expected)
    result = evaluate_model("random", predictions, truth, n_boot=0)
    assert result.metrics["mauc"] == pytest.approx(
        roc_auc_score(truth, predictions[PROBABILITIES].to_numpy()[:, order], multi_class="ovo")
    )
    one_vs_rest = [roc_auc_score(truth == c, predictions[f"p_{c}"]) for c in CLASSES]
    assert result.metrics["auc_ovr"] == pytest.approx(np.mean(one_vs_rest))
    for c, (fpr, tpr, auc) in result.roc.items():
        assert auc == pytest.approx(np.trapezoid(tpr, fpr))
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1, c


def test_a_calibrated_model_has_ece_near_zero_and_an_overconfident_one_a_large_ece() -> None:
    # 10 patients at confidence 0.8 (8 right) and 10 at 0.5 (5 right): calibrated.
    labels = ["AD"] * 8 + ["MCI"] * 2 + ["CN"] * 5 + ["AD"] * 5
    proba = np.array([[0.8, 0.1, 0.1]] * 10 + [[0.25, 0.25, 0.5]] * 10)
    ece, bins = expected_calibration_error(labels, proba, CLASSES)
    assert ece == pytest.approx(0)
    assert bins.to_dict("list") == {
        "confidence": [pytest.approx(0.5), pytest.approx(0.8)],
        "accuracy": [0.5, 0.8],
        "count": [10, 10],
    }

    overconfident = np.array([[0.98, 0.01, 0.01]] * 20)  # 98% sure, right half the time
    ece, bins = expected_calibration_error(["AD", "CN"] * 10, overconfident, CLASSES)
    assert ece == pytest.approx(0.48)
    assert len(bins) == 1


def test_probability_metrics_need_probabilities_on_every_scored_row() -> None:
    truth, predictions, _ = random_case(30, seed=0)
    predictions.loc[4, PROBABILITIES] = np.nan  # e.g. a failed row

    result = evaluate_model("some-missing", predictions, truth, n_boot=0)

    assert all(math.isnan(result.metrics[k]) for k in ("auc_ovr", "mauc", "ece"))
    assert result.roc == {} and result.reliability.empty
    assert math.isnan(
        evaluate_model("teacher", predictions[["patient_id", "diagnosis"]], truth).metrics["ece"]
    )


def test_mcnemar_exact_matches_a_hand_computation() -> None:
    # Discordant pairs 10 vs 2: P(X <= 2), X ~ Bin(12, 1/2) = (1 + 12 + 66) / 4096; doubled.
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(10, 2) == pytest.approx(0.0386, abs=5e-5)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(7, 7) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 17) == pytest.approx(binomtest(3, 20).pvalue)


def test_bootstrap_ci_contains_the_estimate_narrows_with_n_and_is_seeded() -> None:
    def ci_width(n: int) -> float:
        truth, predictions, _ = random_case(n, seed=5)
        m = evaluate_model("m", predictions, truth, n_boot=500, seed=1).metrics
        for score in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert m[f"{score}_lo"] <= m[score] <= m[f"{score}_hi"]
        return m["accuracy_hi"] - m["accuracy_lo"]

    assert ci_width(1000) < ci_width(100) / 2

    truth, predictions, _ = random_case(80, seed=6)
    first = evaluate_model("m", predictions, truth, seed=7).metrics
    assert first == evaluate_model("m", predictions.iloc[::-1], truth, seed=7).metrics
    assert first != evaluate_model("m", predictions, truth, seed=8).metrics


def test_the_subject_of_a_visit_is_its_source_and_rid() -> None:
    assert subject_of("adni-1234-m06") == "adni-1234"
    assert subject_of("oasis_3-7-bl") == subject_of("oasis_3-7-m12") == "oasis_3-7"
    assert subject_of("adni--5-bl") == "adni--5"  # a negative RID keeps its sign
    assert subject_of("adni-12-") == "adni-12"  # no VISCODE
    for malformed in ("P0001", "adni-12", "-12-bl"):
        with pytest.raises(ValueError, match="<source>-<RID>-<VISCODE>"):
            subject_of(malformed)


def accuracy_ci(truth: pd.Series, right: list[bool]) -> tuple[float, float]:
    diagnoses = [label if ok else "CN" for label, ok in zip(truth, right, strict=True)]
    m = evaluate_model("m", predictions_of(truth, diagnoses), truth, n_boot=2000, seed=3).metrics
    return m["accuracy_lo"], m["accuracy_hi"]


def test_bootstrap_resamples_subjects_with_all_their_visits() -> None:
    """One subject's visits never split: with a single subject every resample is the data."""
    truth = truth_of(["AD"] * 10, subjects=[7] * 10)
    assert accuracy_ci(truth, [True, False] * 5) == (0.5, 0.5)  # visits would give ~[0.2, 0.8]


def test_correlated_visits_of_one_subject_widen_the_ci() -> None:
    """50 visits of one subject all right, 50 subjects of one visit each all wrong: the
    evidence is 51 subjects, not 100 independent visits, and the interval says so."""
    right = [True] * 50 + [False] * 50
    clustered = accuracy_ci(truth_of(["AD"] * 100, subjects=[0] * 50 + list(range(1, 51))), right)
    independent = accuracy_ci(truth_of(["AD"] * 100), right)
    assert independent[1] - independent[0] < 0.25  # ~ 0.5 +- 2 sqrt(0.25 / 100)
    assert clustered[0] == 0.0 and clustered[1] > 0.7  # the subject drawn 0, 1, 2, 3 ... times


def test_paired_comparisons_count_every_pair_on_the_shared_patients() -> None:
    truth = truth_of(["AD", "MCI", "CN", "AD", "MCI", "CN"])
    models = {
        "a": predictions_of(truth, ["AD", "MCI", "CN", "AD", "CN", None]),  # 4 right
        "b": predictions_of(truth, ["AD", "AD", "AD", "AD", "MCI"]),  # no row for P0005
        "c": predictions_of(truth, list(truth)),
    }

    table = paired_comparisons(models, truth)

    assert list(table[["model_a", "model_b"]].itertuples(index=False, name=None)) == [
        ("a", "b"), ("a", "c"), ("b", "c"),
    ]  # fmt: skip
    a_b = table.iloc[0]
    assert (a_b["n"], a_b["both_right"], a_b["a_only"], a_b["b_only"], a_b["both_wrong"]) == (
        5, 2, 2, 1, 0,
    )  # fmt: skip
    assert a_b["p_value"] == pytest.approx(mcnemar_exact(2, 1))
    a_c = table.iloc[1]
    assert (a_c["n"], a_c["a_only"], a_c["b_only"]) == (6, 0, 2)
    assert paired_comparisons({"a": models["a"]}, truth).empty
