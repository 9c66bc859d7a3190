"""Exemplar selection with the real bundled MiniLM (no mocks): retrieval, class balance,
determinism, exclusion of the query's own subject, and independence from query labels."""

from __future__ import annotations

import inspect
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from radiag.cohort.schema import Label
from radiag.teacher.exemplars import (
    ExemplarConfig,
    ExemplarPool,
    embed,
    minilm_dir,
    subject_of,
    training_pool,
)

REGIONS = (
    "Atrophy of hippocampus",
    "Atrophy of entorhinal cortex",
    "Atrophy of middle temporal gyrus",
    "Overall brain atrophy",
    "Ventricle enlargement",
)
# Class-typical MMSE range and MRI grade probabilities (No, Mild, Severe).
PROFILE = {
    "AD": ((18, 24), (0.1, 0.4, 0.5)),
    "MCI": ((24, 28), (0.3, 0.5, 0.2)),
    "CN": ((28, 31), (0.8, 0.2, 0.0)),
}


def describe(rng: np.random.Generator, label: str) -> str:
    """A paper-template description whose values are typical of `label`."""
    (lo, hi), grade_p = PROFILE[label]
    sex = rng.choice(["male", "female"])
    apoe = rng.choice(["no", "one copy of", "two copies of"])
    bullets = "\n".join(
        f"- {r}: {rng.choice(['No', 'Mild', 'Severe'], p=grade_p)}" for r in REGIONS
    )
    return (
        f"This patient is a {rng.integers(60, 90)}-year-old {sex} who has completed "
        f"{rng.integers(8, 21)} years of education and is {rng.choice(['married', 'widowed'])}. "
        f"The patient has a Mini-mental State Examination score of {rng.integers(lo, hi)}/30 "
        f"and has {apoe} APOE4 gene. Also, based on their MRI scans:\n{bullets}"
    )


def make_train(n_per_class: int = 5, seed: int = 0) -> pd.DataFrame:
    """Training rows (one baseline visit per subject) with rationales and QC flags."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in ("AD", "MCI", "CN") * n_per_class:
        rid = len(rows) + 1
        rows.append(
            {
                "patient_id": f"synthetic-{rid}-bl",
                "RID": rid,
                "label": label,
                "description": describe(rng, label),
                "rationale": f"Reasoning for subject {rid}, which points to {label}.",
                "qc_flagged": False,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def train() -> pd.DataFrame:
    return make_train()


@pytest.fixture(scope="module")
def similar_pool(train: pd.DataFrame) -> ExemplarPool:
    return ExemplarPool.build(train, ExemplarConfig(k=3, strategy="similar", balanced=True))


def test_model_is_bundled_in_the_package() -> None:
    assert (minilm_dir() / "model.safetensors").is_file()


def test_embed_returns_unit_vectors_and_same_text_same_vector() -> None:
    texts = ["MMSE 21/30, severe hippocampal atrophy.", "MMSE 30/30, no atrophy."]
    vectors = embed([texts[0], texts[1], texts[0]])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    np.testing.assert_allclose(embed([texts[0]])[0], vectors[0], atol=1e-5)  # batch-independent
    assert embed([]).shape == (0, 384)


def test_near_duplicate_retrieves_its_pool_row_first(
    train: pd.DataFrame, similar_pool: ExemplarPool
) -> None:
    unbalanced = ExemplarPool.build(train, ExemplarConfig(k=3, balanced=False))
    for row in (0, 4, 8):  # an AD, an MCI and a CN patient
        source = train.iloc[row]
        query = (
            source["description"]
            .replace(" is married.", " is married now.")
            .replace(" is widowed.", " is a widow.")
        )
        assert query != source["description"]
        for pool in (unbalanced, similar_pool):
            assert pool.select([query])[0][0].patient_id == source["patient_id"]


def test_balanced_k3_gives_one_exemplar_of_each_class(
    train: pd.DataFrame, similar_pool: ExemplarPool
) -> None:
    queries = [
        describe(np.random.default_rng(100 + i), label) for i, label in enumerate(["AD"] * 4)
    ]
    for shots in similar_pool.select(queries + train["description"].tolist()):
        assert sorted(s.label for s in shots) == sorted(Label)
    # k=4 still spreads over the classes (2 + 1 + 1).
    pool4 = ExemplarPool.build(train, ExemplarConfig(k=4))
    for shots in pool4.select(queries):
        assert len(shots) == 4 and set(s.label for s in shots) == set(Label)


def test_a_class_without_rows_is_filled_from_the_others(train: pd.DataFrame) -> None:
    no_cn = train[train["label"] != "CN"]
    for strategy in ("similar", "fixed", "random"):
        pool = ExemplarPool.build(no_cn, ExemplarConfig(k=3, strategy=strategy))
        (shots,) = pool.select([train["description"].iloc[2]])
        assert len(shots) == 3 and {s.label for s in shots} == {Label.AD, Label.MCI}


def test_fixed_is_the_same_for_every_query_and_seed_deterministic(train: pd.DataFrame) -> None:
    cfg = ExemplarConfig(k=3, strategy="fixed", seed=7)
    pool = ExemplarPool.build(train, cfg)
    assert pool.embeddings is None  # nothing to embed
    chosen = pool.select(["first query", "second query", "a third"])
    assert chosen[0] == chosen[1] == chosen[2]
    assert sorted(s.label for s in chosen[0]) == sorted(Label)
    shuffled = train.sample(frac=1.0, random_state=3)  # pool row order does not matter
    assert ExemplarPool.build(shuffled, cfg).select(["x"])[0] == chosen[0]
    by_seed = {
        tuple(
            s.patient_id
            for s in ExemplarPool.build(train, cfg.model_copy(update={"seed": seed})).select(["x"])[
                0
            ]
        )
        for seed in range(5)
    }
    assert len(by_seed) > 1


def test_random_draws_per_patient_the_same_in_any_batch(train: pd.DataFrame) -> None:
    cfg = ExemplarConfig(k=3, strategy="random", seed=7)
    pool = ExemplarPool.build(train, cfg)
    assert pool.embeddings is None  # nothing to embed
    ids = ["synthetic-900-bl", "synthetic-901-bl", "synthetic-902-bl", "synthetic-903-bl"]
    together = pool.select(["same text"] * 4, ids)
    assert len({tuple(s.patient_id for s in shots) for shots in together}) > 1  # per patient
    assert all(sorted(s.label for s in shots) == sorted(Label) for shots in together)
    alone = [pool.select(["other text"], [pid])[0] for pid in reversed(ids)]
    assert alone[::-1] == together  # keyed by the patient, not its batch, order or text
    reseeded = ExemplarPool.build(train, cfg.model_copy(update={"seed": 8}))
    assert reseeded.select(["same text"] * 4, ids) != together


def test_query_patient_and_its_other_visits_are_never_returned(train: pd.DataFrame) -> None:
    second_visit = train.iloc[[0]].assign(patient_id="synthetic-1-m06")
    pool_rows = pd.concat([train, second_visit], ignore_index=True)
    ids = train["patient_id"].tolist()
    for strategy in ("similar", "fixed", "random"):
        for balanced in (True, False):
            pool = ExemplarPool.build(
                pool_rows, ExemplarConfig(k=5, strategy=strategy, balanced=balanced)
            )
            for pid, shots in zip(
                ids, pool.select(train["description"].tolist(), ids), strict=True
            ):
                assert len(shots) == 5
                assert all(subject_of(s.patient_id) != subject_of(pid) for s in shots)
    assert subject_of("synthetic-1-m06") == subject_of("synthetic-1-bl") == "synthetic-1"


def test_k0_gives_empty_lists(train: pd.DataFrame) -> None:
    for strategy in ("similar", "fixed", "random"):
        pool = ExemplarPool.build(train, ExemplarConfig(k=0, strategy=strategy))
        assert pool.select(["a", "b"]) == [[], []]


def test_flagged_rationales_are_excluded(train: pd.DataFrame) -> None:
    flagged = train.assign(qc_flagged=train.index % 2 == 0)
    flagged_ids = set(flagged.loc[flagged["qc_flagged"], "patient_id"])
    queries = train["description"].tolist()
    pool = ExemplarPool.build(flagged, ExemplarConfig(k=3))
    assert not flagged_ids & set(pool.patient_ids)
    assert not flagged_ids & {s.patient_id for shots in pool.select(queries) for s in shots}
    keep_all = ExemplarPool.build(flagged, ExemplarConfig(strategy="fixed", exclude_flagged=False))
    assert flagged_ids <= set(keep_all.patient_ids)


def test_selection_cannot_depend_on_the_query_label(
    train: pd.DataFrame, similar_pool: ExemplarPool
) -> None:
    params = inspect.signature(ExemplarPool.select).parameters
    assert list(params) == ["self", "descriptions", "exclude_ids"]
    queries = make_train(n_per_class=2, seed=1).assign(
        patient_id=lambda f: "query-" + f["patient_id"]
    )
    unlabeled = queries.drop(columns=["label"])
    relabeled = queries.assign(label=queries["label"].sample(frac=1.0, random_state=0).to_numpy())
    results = [
        similar_pool.select(q["description"].tolist(), q["patient_id"].tolist())
        for q in (queries, unlabeled, relabeled)
    ]
    assert results[0] == results[1] == results[2]


def test_pool_is_training_rows_with_a_label_and_rationale(train: pd.DataFrame) -> None:
    messy = train.copy()
    messy.loc[0, "label"] = None
    messy.loc[1, "rationale"] = "   "
    pool = ExemplarPool.build(pa.Table.from_pandas(messy), ExemplarConfig(strategy="fixed"))
    assert len(pool) == len(train) - 2
    with pytest.raises(ValueError, match="training split only"):
        ExemplarPool.build(train.assign(split="test"), ExemplarConfig(strategy="fixed"))


def test_training_pool_joins_rationales_and_drops_contradicting_ones(train: pd.DataFrame) -> None:
    rationales = train[["patient_id", "rationale", "qc_flagged"]].assign(diagnosis=train["label"])
    rationales.loc[0, "diagnosis"] = "CN"  # train row 0 is AD: the rationale contradicts it
    joined = training_pool(
        pa.Table.from_pandas(train[["patient_id", "RID", "label", "description"]]), rationales
    )
    assert set(joined["patient_id"]) == set(train["patient_id"][1:])
    assert {"label", "description", "rationale", "qc_flagged"} <= set(joined.columns)


def test_pool_pickles_small_and_selects_the_same(
    train: pd.DataFrame, similar_pool: ExemplarPool
) -> None:
    blob = pickle.dumps(similar_pool)
    assert len(blob) < 100_000
    queries = train["description"].tolist()[:3]
    assert pickle.loads(blob).select(queries) == similar_pool.select(queries)
