"""Classical baselines: scikit-learn classifiers on the cohort's tabular features.

Kwon et al. (AAAI 2024) set their reasoning models against "traditional
classification" of the same patients. Each (classifier, feature set) pair is one
model, `baseline-<classifier>-<feature_set>`, whose test-split predictions are
written to `predictions/<model>/` in the shared output schema, so evaluation
scores it exactly like the teacher and the students.

Only labelled train rows are fitted (val and test labels are never read); the
imputer and the scaler sit inside the sklearn Pipeline, so they are fitted on
train too. The stage follows the stage contract (`radiag.contract`): a re-run with
the same config and the same splits is skipped; another config is refused, or with
`fresh` its predictions are superseded, so rows are never mixed or duplicated.
"""

from __future__ import annotations

import datetime
import io
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from radiag.cohort.schema import Label
from radiag.cohort.stages import SPLITS_STAGE
from radiag.config import StrictModel
from radiag.contract import Stage, StageIdentity, StageSummary, config_identity, run_stage, upstream
from radiag.errors import UserError
from radiag.outputs import PROBABILITY_COLUMNS, predictions_dir, write_part
from radiag.store import RunStore

if TYPE_CHECKING:  # scikit-learn loads where a baseline is fitted or read, not with its config
    from sklearn.pipeline import Pipeline

Classifier = Literal["logistic", "gradient_boosting"]
FeatureSet = Literal["tabular", "description", "tabular_cognition"]

TRAIN_TABLE = "splits/train.parquet"
MODELS_DIR = "baselines"  # one fitted pipeline per model: what `radiag serve` loads
TEST_TABLE = "splits/test.parquet"

REGIONS = ("Hippocampus", "Entorhinal", "Fusiform", "MidTemp", "WholeBrain", "Ventricles")
"""MRI regions the cohort measures; each enters as log(volume / ICV), i.e. head-size normalised."""

TABULAR_COLUMNS = ("age_at_visit", "PTGENDER", "PTEDUCAT", "APOE4", *REGIONS, "ICV")
"""Demographics, APOE4 and MRI volumes: the facts a patient description states without
any cognitive test (the paper's description also states MMSE, here in COGNITION_COLUMNS;
marital status is left out as it says nothing about the brain)."""

COGNITION_COLUMNS = ("MMSE", "CDRSB", "ADAS13")
"""Cognitive scores. The clinical diagnosis is largely defined by them, so they show how
much of the accuracy comes from tests rather than from anatomy and risk factors."""

FEATURE_SETS: dict[FeatureSet, tuple[str, ...]] = {
    "tabular": TABULAR_COLUMNS,
    "description": (*TABULAR_COLUMNS, "MMSE"),  # exactly what the teacher's text states
    "tabular_cognition": (*TABULAR_COLUMNS, *COGNITION_COLUMNS),
}


class BaselineInputError(UserError, RuntimeError):
    """A split table the baselines cannot use; the message names the file."""


class BaselineConfig(StrictModel):
    """Which baselines to fit: every classifier on every feature set."""

    classifiers: list[Classifier] = Field(
        default_factory=lambda: ["logistic", "gradient_boosting"], min_length=1
    )
    feature_sets: list[FeatureSet] = Field(
        default_factory=lambda: ["tabular", "description", "tabular_cognition"], min_length=1
    )
    seed: int = Field(0, description="random_state of the gradient boosting")


class ModelSummary(BaseModel):
    """One fitted baseline: rows it saw, the features it used, fit + predict time."""

    n_train: int
    n_test: int
    features: list[str]
    seconds: float


def model_name(classifier: Classifier, feature_set: FeatureSet) -> str:
    return f"baseline-{classifier}-{feature_set}"


BASELINE_MODELS: dict[str, tuple[Classifier, FeatureSet]] = {
    model_name(c, f): (c, f) for c in get_args(Classifier) for f in get_args(FeatureSet)
}
"""Every baseline's name -> its (classifier, feature set): a name says how to refit it."""

BASELINE_STAGE = Stage("baseline", "baselines", also=tuple(map(predictions_dir, BASELINE_MODELS)))


def feature_matrix(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Model inputs from cohort columns; a missing value stays NaN for the imputer."""
    out: dict[str, pd.Series] = {}
    for column in columns:
        if column == "PTGENDER":
            out["female"] = frame[column].map({"Female": 1.0, "Male": 0.0}).astype(float)
        elif column in REGIONS:
            # log: volumes scale multiplicatively with head size, and Ventricles are skewed.
            out[f"log_{column}_icv"] = np.log(
                frame[column].astype(float) / frame["ICV"].astype(float)
            )
        elif column != "ICV":  # ICV only normalises the regions
            out[column] = frame[column].astype(float)
    return pd.DataFrame(out)


def build_classifier(classifier: Classifier, seed: int) -> Pipeline:
    """Both share the same median imputation, so they see identical inputs."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    impute = ("impute", SimpleImputer(strategy="median"))
    if classifier == "logistic":
        model = LogisticRegression(class_weight="balanced", max_iter=1000)
        return Pipeline([impute, ("scale", StandardScaler()), ("model", model)])
    model = HistGradientBoostingClassifier(class_weight="balanced", random_state=seed)
    return Pipeline([impute, ("model", model)])


def model_path(name: str) -> str:
    return f"{MODELS_DIR}/{name}.joblib"


def load_baseline(store: RunStore, name: str) -> tuple[Pipeline, FeatureSet]:
    """A fitted baseline of this run and its feature set (joblib: trust only your own runs).

    Raises:
        BaselineInputError: the run has no such fitted model.
    """
    if not store.exists(model_path(name)):
        raise BaselineInputError(
            f"{store.uri_of(model_path(name))} does not exist: run `radiag baseline` "
            "(runs made before baselines were saved need `--fresh`)"
        )
    import joblib

    saved = joblib.load(io.BytesIO(store.read_bytes(model_path(name))))
    return saved["pipeline"], saved["feature_set"]


def predict_rows(
    name: str, pipeline: Pipeline, feature_set: FeatureSet, frame: pd.DataFrame, seed: int = 0
) -> list[dict[str, object]]:
    """Output rows (diagnosis + probabilities) of a fitted baseline for cohort rows."""
    return predict_columns(name, pipeline, FEATURE_SETS[feature_set], frame, seed)


def predict_columns(
    name: str, pipeline: Pipeline, columns: Sequence[str], frame: pd.DataFrame, seed: int = 0
) -> list[dict[str, object]]:
    """`predict_rows` for a pipeline fitted on any `columns` (a refit on another cohort's
    shared features has no feature set of its own)."""
    return _predict_rows(name, pipeline, feature_matrix(frame, columns), frame["patient_id"], seed)


def unmeasured_columns(frame: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The `columns` a cohort never measured (absent, or null in every row), in order.

    The imputer would fill such a column with the training cohort's median for every
    patient, so a model would look as if it used a feature it never saw. A region is
    unmeasured too when ICV is: it enters only divided by ICV.
    """
    never = {c for c in columns if c not in frame or frame[c].isna().all()}
    if "ICV" in never:
        never |= set(REGIONS) & set(columns)
    return [c for c in columns if c in never]


def fit_baseline(
    classifier: Classifier, columns: Sequence[str], train: pd.DataFrame, seed: int
) -> Pipeline:
    """A classifier fitted on the labelled `train` rows' `columns`."""
    return build_classifier(classifier, seed).fit(feature_matrix(train, columns), train["label"])


def _save(store: RunStore, name: str, pipeline: Pipeline, feature_set: FeatureSet) -> None:
    import joblib

    buffer = io.BytesIO()
    joblib.dump({"pipeline": pipeline, "feature_set": feature_set}, buffer)
    store.write_bytes(model_path(name), buffer.getvalue())


def read_split(store: RunStore, path: str, needed: set[str]) -> pd.DataFrame:
    """The `needed` columns of a split table (read no others: test labels stay unread).

    Raises:
        BaselineInputError: the table lacks one of them.
    """
    table = store.read_table(path)
    if missing := sorted(needed - set(table.column_names)):
        raise BaselineInputError(
            f"{store.uri_of(path)} lacks column(s) the baselines need: {', '.join(missing)}"
        )
    return table.select(sorted(needed)).to_pandas()


def _predict_rows(
    name: str, pipeline: Pipeline, x: pd.DataFrame, ids: pd.Series, seed: int
) -> list[dict[str, object]]:
    """One output row per test row: argmax diagnosis and the three class probabilities."""
    if x.empty:  # sklearn refuses to predict zero rows
        return []
    start = time.perf_counter()
    proba = pipeline.predict_proba(x)  # (rows, classes), columns in pipeline.classes_ order
    shared = {
        "task": "diagnose",
        "engine": "scikit-learn",
        "model": name,
        "seed": seed,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "latency_s": (time.perf_counter() - start) / len(x),
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    classes = [str(c) for c in pipeline.classes_]
    columns = [PROBABILITY_COLUMNS[Label(c)] for c in classes]
    return [
        {
            **shared,
            "patient_id": patient_id,
            "diagnosis": classes[int(np.argmax(p))],
            **dict(zip(columns, p.tolist(), strict=True)),
        }
        for patient_id, p in zip(ids, proba, strict=True)
    ]


def run_baseline(cfg: BaselineConfig, store: RunStore, fresh: bool = False) -> StageSummary:
    """splits/{train,test} -> predictions/baseline-*/, under the stage contract.

    Raises:
        BaselineInputError: a split lacks a needed column, or train lacks a class.
    """
    identity = StageIdentity(
        stage="baseline", config=config_identity(cfg), upstream=upstream(store, [SPLITS_STAGE])
    )
    return run_stage(store, BASELINE_STAGE, identity, lambda: _fit_all(cfg, store), fresh=fresh)


def training_rows(store: RunStore, columns: set[str]) -> pd.DataFrame:
    """The labelled training rows (patient_id, label and `columns`), with every class present.

    Raises:
        BaselineInputError: a column is missing, or train lacks a class.
    """
    train = read_split(store, TRAIN_TABLE, {"patient_id", "label", *columns})
    train = train[train["label"].notna()]
    if absent := [label.value for label in Label if label not in set(train["label"])]:
        raise BaselineInputError(
            f"{store.uri_of(TRAIN_TABLE)} has no labelled rows of class(es) {', '.join(absent)}"
        )
    return train


def _fit_all(cfg: BaselineConfig, store: RunStore) -> StageSummary:
    needed = {"patient_id"}.union(*(FEATURE_SETS[f] for f in cfg.feature_sets))
    train = training_rows(store, needed)
    test = read_split(store, TEST_TABLE, needed)
    models = {}
    for classifier in cfg.classifiers:
        for feature_set in cfg.feature_sets:
            name = model_name(classifier, feature_set)
            start = time.perf_counter()
            pipeline = fit_baseline(classifier, FEATURE_SETS[feature_set], train, cfg.seed)
            _save(store, name, pipeline, feature_set)
            rows = predict_rows(name, pipeline, feature_set, test, cfg.seed)
            directory = predictions_dir(name)
            store.fs.delete_dir_contents(store.path(directory), missing_dir_ok=True)
            write_part(store, directory, rows)
            models[name] = ModelSummary(
                n_train=len(train),
                n_test=len(test),
                features=list(pipeline.feature_names_in_),
                seconds=round(time.perf_counter() - start, 3),
            )
    return StageSummary(
        stage="baseline",
        counts={name: model.n_test for name, model in models.items()},
        details={name: model.model_dump() for name, model in models.items()},
    )
