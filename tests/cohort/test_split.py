"""Splits are by subject: all visits of a RID in one split, stratified, seeded."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from radiag.cohort.split import NoImagedVisitsError, SplitConfig, split_cohort
from radiag.cohort.stages import IngestConfig, ingest
from radiag.cohort.synthetic import SynthConfig
from radiag.store import RunStore


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    store = RunStore(str(tmp_path_factory.mktemp("run")))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=1000, max_visits=4)), store)
    return store.read_table("cohort/cohort.parquet")


def test_no_subject_is_in_two_splits(cohort) -> None:
    tables, _ = split_cohort(cohort, SplitConfig())
    subjects = {name: set(t["RID"].to_pylist()) for name, t in tables.items()}
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["val"]
    assert not subjects["val"] & subjects["test"]
    assert sum(t.num_rows for t in tables.values()) == cohort.num_rows  # no visit lost


def test_each_label_is_split_in_the_configured_proportions(cohort) -> None:
    _, assignment = split_cohort(cohort, SplitConfig(train=0.6, val=0.2, test=0.2))
    shares = assignment.groupby("stratum")["split"].value_counts(normalize=True)
    for label in ("CN", "MCI", "AD"):
        assert shares[label]["train"] == pytest.approx(0.6, abs=0.02)
        assert shares[label]["test"] == pytest.approx(0.2, abs=0.02)


def test_the_same_seed_gives_the_same_split_and_another_seed_another(cohort) -> None:
    first = split_cohort(cohort, SplitConfig(seed=1))[1]
    assert first.equals(split_cohort(cohort, SplitConfig(seed=1))[1])
    assert not first["split"].equals(split_cohort(cohort, SplitConfig(seed=2))[1]["split"])


def test_baseline_only_keeps_one_visit_per_subject(cohort) -> None:
    tables, _ = split_cohort(cohort, SplitConfig(visits="baseline"))
    for table in tables.values():
        assert pc.all(pc.equal(table["VISCODE"], "bl")).as_py()
        assert len(pc.unique(table["RID"])) == table.num_rows


def test_imaged_keeps_exactly_the_visits_with_a_t1_and_still_splits_by_subject(cohort) -> None:
    imaged = [f"t1/{pid}.nii.gz" if i % 3 == 0 else None
              for i, pid in enumerate(cohort["patient_id"].to_pylist())]  # fmt: skip
    with_t1 = cohort.set_column(
        cohort.schema.get_field_index("mri_path"), "mri_path", pa.array(imaged, pa.string())
    )
    tables, assignment = split_cohort(with_t1, SplitConfig(visits="imaged"))
    kept = sorted(pid for t in tables.values() for pid in t["patient_id"].to_pylist())
    ids = cohort["patient_id"].to_pylist()
    assert kept == sorted(pid for pid, path in zip(ids, imaged, strict=True) if path)
    split_of = assignment.set_index("RID")["split"]
    for name, table in tables.items():
        assert {split_of[rid] for rid in table["RID"].to_pylist()} == {name}


def test_imaged_without_any_t1_is_refused_naming_the_mri_stage(cohort) -> None:
    with pytest.raises(NoImagedVisitsError, match="mri stage"):
        split_cohort(cohort, SplitConfig(visits="imaged"))
