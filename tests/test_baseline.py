"""The classical baselines: scikit-learn on tabular features, predictions in the shared schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.metrics import balanced_accuracy_score

from radiag.baseline import (
    BASELINE_STAGE,
    BaselineConfig,
    BaselineInputError,
    ModelSummary,
    model_name,
    run_baseline,
)
from radiag.cohort.describe import DescribeConfig
from radiag.cohort.schema import Label
from radiag.cohort.split import SplitConfig
from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import StageConflict, read_record
from radiag.outputs import OUTPUT_SCHEMA, PROBABILITY_COLUMNS, predictions_dir, read_parts
from radiag.store import RunStore

MODELS = [
    model_name(classifier, feature_set)
    for classifier in ("logistic", "gradient_boosting")
    for feature_set in ("tabular", "description", "tabular_cognition")
]
P_COLUMNS = list(PROBABILITY_COLUMNS.values())


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with splits of a 600-subject synthetic cohort (one visit each)."""
    root = tmp_path_factory.mktemp("baseline-splits")
    store = RunStore(str(root))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=600, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    return root


def fresh_run(splits: Path, target: Path) -> RunStore:
    """A new run directory holding only copies of the split tables."""
    shutil.copytree(splits / "splits", target / "splits")
    return RunStore(str(target))


@pytest.fixture(scope="module")
def run(splits: Path, tmp_path_factory: pytest.TempPathFactory) -> RunStore:
    store = fresh_run(splits, tmp_path_factory.mktemp("baseline-run"))
    run_baseline(BaselineConfig(), store)
    return store


def predictions(store: RunStore, model: str) -> pd.DataFrame:
    return read_parts(store, predictions_dir(model)).to_pandas().set_index("patient_id")


def test_every_model_predicts_every_test_row_in_the_output_schema(run: RunStore) -> None:
    test_ids = set(run.read_table("splits/test.parquet")["patient_id"].to_pylist())
    for model in MODELS:
        table = read_parts(run, predictions_dir(model))
        assert table.schema == OUTPUT_SCHEMA
        out = table.to_pandas().set_index("patient_id")
        assert set(out.index) == test_ids and out.index.is_unique
        assert (out[["task", "engine", "model"]] == ["diagnose", "scikit-learn", model]).all().all()
        np.testing.assert_allclose(out[P_COLUMNS].sum(axis=1), 1.0)
        # The diagnosis is the most probable class, and there is no rationale to give.
        best = out[P_COLUMNS].idxmax(axis=1).str.removeprefix("p_")
        assert (out["diagnosis"] == best).all() and set(best) <= set(Label)
        assert out["rationale"].isna().all()
        assert (out[["prompt_tokens", "completion_tokens"]] == 0).all().all()
        assert (out["latency_s"] >= 0).all() and out["created_at"].notna().all()


def test_summary_records_each_model_and_is_stored(run: RunStore) -> None:
    summary = read_record(run, BASELINE_STAGE).summary
    assert list(summary.details) == MODELS
    logistic = ModelSummary.model_validate(summary.details["baseline-logistic-tabular_cognition"])
    assert logistic.n_test == run.read_table("splits/test.parquet").num_rows
    assert {"MMSE", "CDRSB", "ADAS13", "log_Hippocampus_icv"} <= set(logistic.features)
    assert "MMSE" not in summary.details["baseline-logistic-tabular"]["features"]


@pytest.mark.parametrize("classifier", ["logistic", "gradient_boosting"])
def test_cognitive_scores_lift_balanced_accuracy_well_above_chance(
    run: RunStore, classifier: str
) -> None:
    """Measured on this cohort: about 0.64 / 0.86 (logistic), 0.57 / 0.86 (boosting); chance 1/3."""
    truth = run.read_table("splits/test.parquet").to_pandas().set_index("patient_id")["label"]
    truth = truth.dropna()
    score = {
        features: balanced_accuracy_score(
            truth, predictions(run, model_name(classifier, features)).loc[truth.index, "diagnosis"]
        )
        for features in ("tabular", "description", "tabular_cognition")
    }
    assert score["tabular"] > 0.5
    assert score["description"] >= score["tabular"]  # MMSE adds information
    assert score["tabular_cognition"] > 0.75
    assert score["tabular_cognition"] > score["tabular"] + 0.1


def test_fit_uses_train_labels_only(run: RunStore, splits: Path, tmp_path: Path) -> None:
    store = fresh_run(splits, tmp_path)
    test = store.read_table("splits/test.parquet")
    garbage = pa.array(["AD"] * test.num_rows)
    index = test.schema.get_field_index("label")
    store.write_table("splits/test.parquet", test.set_column(index, "label", garbage))
    run_baseline(BaselineConfig(), store)
    for model in MODELS:
        expected = predictions(run, model)[["diagnosis", *P_COLUMNS]]
        got = predictions(store, model).loc[expected.index, ["diagnosis", *P_COLUMNS]]
        pd.testing.assert_frame_equal(got, expected)


def test_rerun_skips_refuses_or_supersedes_and_never_duplicates(
    splits: Path, tmp_path: Path
) -> None:
    store = fresh_run(splits, tmp_path)
    cfg = BaselineConfig(classifiers=["logistic"], feature_sets=["tabular"])
    first = run_baseline(cfg, store)
    assert run_baseline(cfg, store) == first  # same config, same splits: skipped
    reseeded = BaselineConfig(classifiers=["logistic"], feature_sets=["tabular"], seed=7)
    with pytest.raises(StageConflict, match=r"changed: config\.seed"):
        run_baseline(reseeded, store)
    run_baseline(reseeded, store, fresh=True)
    directory = predictions_dir("baseline-logistic-tabular")
    assert len(store.list_files(directory, suffix=".parquet")) == 1
    out = predictions(store, "baseline-logistic-tabular")
    assert out.index.is_unique and len(out) == first.counts["baseline-logistic-tabular"]
    assert (out["seed"] == 7).all()
    superseded = f"superseded/baseline-{first.identity}/{directory}"
    assert len(store.list_files(superseded, suffix=".parquet")) == 1


def test_a_missing_column_is_an_error_naming_the_file_and_column(
    splits: Path, tmp_path: Path
) -> None:
    store = fresh_run(splits, tmp_path)
    test = store.read_table("splits/test.parquet")
    store.write_table("splits/test.parquet", test.drop_columns(["MMSE", "Hippocampus"]))
    with pytest.raises(BaselineInputError, match=r"splits/test\.parquet .*Hippocampus, MMSE"):
        run_baseline(BaselineConfig(), store)


def test_a_class_without_labelled_train_rows_is_an_error(splits: Path, tmp_path: Path) -> None:
    store = fresh_run(splits, tmp_path)
    train = store.read_table("splits/train.parquet")
    labels = [None if label == "AD" else label for label in train["label"].to_pylist()]
    index = train.schema.get_field_index("label")
    store.write_table(
        "splits/train.parquet", train.set_column(index, "label", pa.array(labels, pa.string()))
    )
    with pytest.raises(BaselineInputError, match=r"splits/train\.parquet has no labelled .* AD"):
        run_baseline(BaselineConfig(), store)
