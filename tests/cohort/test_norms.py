"""Norms that fit the cohort: `describe.norm: reference | fitted | <saved norm>`.

A norm fitted on the CN subjects of a cohort's training split grades a cohort measured by
another segmentation pipeline as its own scale would; it never sees a test subject; it is
saved with its provenance and graded with again (another run, the serving path).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from radiag.cohort.describe import (
    FIT_MIN_SUBJECTS,
    FIT_VERSION,
    MRI_FINDINGS,
    DescribeConfig,
    NormativeModel,
    describe,
    fit_norm,
    reference_norm,
)
from radiag.cohort.readers import CohortReadError
from radiag.cohort.schema import COHORT_SCHEMA
from radiag.cohort.split import SplitConfig, split_cohort
from radiag.cohort.stages import (
    COHORT_STAGE,
    COHORT_TABLE,
    NORM_FILE,
    SPLITS_STAGE,
    IngestConfig,
    describe_and_split,
    ingest,
    run_norm,
)
from radiag.cohort.synthetic import SynthConfig
from radiag.contract import StageConflict, StageIdentity, StageSummary, read_record, run_stage
from radiag.serving.records import SERVED_COLUMNS, PatientRecord, describe_record
from radiag.store import RunStore

REGIONS = [region for region, _ in MRI_FINDINGS]
GRADES = [f"grade_{region}" for region in REGIONS]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    store = RunStore(str(tmp_path_factory.mktemp("ingest")))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=800, max_visits=2)), store)
    return store.read_table(COHORT_TABLE)


def scaled(
    table: pa.Table,
    factor: float,
    icv_factor: float = 1.0,
    rows: pa.ChunkedArray | None = None,
    regions: tuple[str, ...] = tuple(REGIONS),
) -> pa.Table:
    """`regions` times `factor` and ICV times `icv_factor` (in `rows`, or all): the same
    brains measured by another pipeline."""
    for name, by in [*((region, factor) for region in regions), ("ICV", icv_factor)]:
        column = pc.multiply(table[name], by)
        if rows is not None:
            column = pc.if_else(rows, column, table[name])
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table


def in_split(table: pa.Table, split: str) -> pa.ChunkedArray:
    """Which rows belong to subjects of `split` (volumes do not move a subject's split)."""
    _, assignment = split_cohort(table, SplitConfig())
    members = assignment.loc[assignment["split"] == split, "RID"].tolist()
    return pc.is_in(table["RID"], pa.array(members, pa.int64()))


def run_on(store: RunStore, cohort: pa.Table, norm: str = "fitted") -> StageSummary:
    """The splits stage over `cohort`, recorded as a finished ingest of a fixture identity."""

    def write() -> StageSummary:
        store.write_table(COHORT_TABLE, cohort)
        return StageSummary(stage="cohort")

    fixture = StageIdentity(stage="cohort", config={"fixture": cohort.num_rows})
    run_stage(store, COHORT_STAGE, fixture, write)
    return describe_and_split(DescribeConfig(norm=norm), SplitConfig(), store)


def graded(table: pa.Table, norm: NormativeModel) -> dict[str, list[str | None]]:
    described = describe(table, DescribeConfig(), norm)
    return {name: described[name].to_pylist() for name in GRADES}


@pytest.mark.parametrize(("factor", "icv_factor"), [(0.8, 1.0), (1.25, 1.1)])
def test_fitted_norm_grades_a_rescaled_cohort_as_the_original(
    cohort: pa.Table, factor: float, icv_factor: float
) -> None:
    tables, _ = split_cohort(cohort, SplitConfig())
    other, _ = split_cohort(scaled(cohort, factor, icv_factor), SplitConfig())

    fitted = graded(tables["test"], fit_norm(tables["train"]))
    assert any(grade is not None for grade in fitted["grade_Hippocampus"])
    assert graded(other["test"], fit_norm(other["train"])) == fitted

    reference = graded(tables["test"], reference_norm())
    shifted = graded(other["test"], reference_norm())
    before, after = np.array(reference[GRADES[0]]), np.array(shifted[GRADES[0]])
    assert np.mean(before != after) > 0.2  # the published norm grades the other scale otherwise


def test_fitted_grades_still_separate_ad_from_cn(cohort: pa.Table) -> None:
    """On a pipeline measuring 50% larger, the reference calls almost every AD hippocampus
    normal; the cohort's own norm finds the atrophy again, and not in the CN."""
    tables, _ = split_cohort(scaled(cohort, 1.5), SplitConfig())
    test = tables["test"]
    labels = np.array(test["label"].to_pylist(), dtype=object)

    def atrophic(norm: NormativeModel, label: str) -> float:
        grades = np.array(graded(test, norm)["grade_Hippocampus"], dtype=object)
        graded_rows = (labels == label) & (grades != None)  # noqa: E711 (elementwise)
        return float(np.mean(np.isin(grades[graded_rows], ["Mild", "Severe"])))

    assert atrophic(reference_norm(), "AD") < 0.3
    fitted = fit_norm(tables["train"])
    assert atrophic(fitted, "AD") > 0.6
    assert atrophic(fitted, "CN") < 0.35


def cn_baselines(n: int, fusiform_measured: int = 0) -> pa.Table:
    """`n` CN baseline visits whose hippocampus follows a known model of ICV, age and sex
    (sd 0.1 in log volume); the first `fusiform_measured` of them have a fusiform too."""
    rng = np.random.default_rng(0)
    icv, age = rng.normal(1.5e6, 1.5e5, n), rng.normal(72, 6, n)
    female = rng.random(n) < 0.5
    log_volume = np.log(7000) + 0.8 * np.log(icv / 1.5e6) - 0.01 * (age - 72) + 0.05 * female
    volume = np.exp(log_volume + rng.normal(0, 0.1, n))
    rows = [
        {name: None for name in COHORT_SCHEMA.names}
        | {"RID": i, "VISCODE": "bl", "label": "CN", "ICV": icv[i], "age_at_visit": age[i]}
        | {"PTGENDER": "Female" if female[i] else "Male", "Hippocampus": volume[i]}
        | {"Fusiform": 18000.0 if i < fusiform_measured else None}
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=COHORT_SCHEMA)


def test_fit_recovers_icv_age_and_sex_effects() -> None:
    n = 400
    table = cn_baselines(n)
    norm = fit_norm(table)
    assert set(norm.regions) == {"Hippocampus"}  # unmeasured regions are not graded
    hippocampus = norm.regions["Hippocampus"]
    assert hippocampus.icv_exponent == pytest.approx(0.8, abs=0.1)
    assert np.log1p(hippocampus.age_slope) == pytest.approx(-0.01, abs=0.003)
    assert hippocampus.female_shift == pytest.approx(0.05, abs=0.03)
    assert hippocampus.resid_sd == pytest.approx(0.1, abs=0.01)
    assert norm.subjects == {"Hippocampus": n}
    z = describe(table, DescribeConfig(), norm)["z_Hippocampus"].to_numpy()
    women = pc.equal(table["PTGENDER"], "Female").to_numpy(zero_copy_only=False)
    for group in (women, ~women):  # adjusted: neither sex reads as atrophic
        assert abs(z[group].mean()) < 0.15
    assert z.std() == pytest.approx(1.0, abs=0.1)


def test_the_fit_never_sees_test_or_validation_subjects(tmp_path, cohort: pa.Table) -> None:
    run_on(RunStore(str(tmp_path / "base")), cohort)
    norm = RunStore(str(tmp_path / "base")).read_json(NORM_FILE)["regions"]

    def norm_after(name: str, rows: pa.ChunkedArray) -> dict:
        store = RunStore(str(tmp_path / name))
        run_on(store, scaled(cohort, 0.5, rows=rows))
        return store.read_json(NORM_FILE)["regions"]

    held_out = pc.or_(in_split(cohort, "test"), in_split(cohort, "val"))
    assert norm_after("held_out", held_out) == norm
    train_cn = pc.and_(in_split(cohort, "train"), pc.equal(cohort["label"], "CN"))
    not_cn_baseline = pc.invert(pc.and_(train_cn, pc.equal(cohort["VISCODE"], "bl")))
    assert norm_after("not_cn_baseline", not_cn_baseline) == norm  # AD, MCI, follow-ups
    assert norm_after("train_cn", train_cn) != norm  # ... and it does see the training CN


def test_the_stage_saves_the_fitted_norm_with_its_provenance(tmp_path, cohort: pa.Table) -> None:
    store = RunStore(str(tmp_path))
    summary = run_on(store, cohort)
    saved = run_norm(store, DescribeConfig(norm="fitted"))
    train = store.read_table("splits/train.parquet")
    cn_baseline = train.filter(
        pc.and_(pc.equal(train["label"], "CN"), pc.equal(train["VISCODE"], "bl"))
    )
    assert saved.kind == "fitted"
    assert saved.fitted_by == {
        "split": "train",
        "stage": summary.identity,
        "upstream": {"cohort": _digest(store)},
    }
    measured = pc.and_(pc.is_valid(cn_baseline["ICV"]), pc.is_valid(cn_baseline["age_at_visit"]))
    for region in REGIONS:
        expected = pc.sum(pc.and_(measured, pc.is_valid(cn_baseline[region]))).as_py()
        assert saved.subjects[region] == expected
    assert summary.details["norm"] == {"kind": "fitted", "subjects": saved.subjects}
    for split in ("train", "val", "test"):
        table = store.read_table(f"splits/{split}.parquet")
        again = describe(undescribed(table), DescribeConfig(), saved)
        assert again["description"].equals(table["description"])
    record = read_record(store, SPLITS_STAGE)
    assert record is not None and record.identity.config["describe"]["norm"] == "fitted"
    assert record.identity.versions["norm"] == FIT_VERSION


def test_the_default_stays_the_reference_norm(tmp_path, cohort: pa.Table) -> None:
    assert DescribeConfig().norm == "reference"
    store = RunStore(str(tmp_path))
    run_on(store, cohort, norm="reference")
    saved = run_norm(store, DescribeConfig())
    assert saved == reference_norm()
    test = store.read_table("splits/test.parquet")
    again = describe(undescribed(test), DescribeConfig())
    assert again["description"].equals(test["description"])
    store.delete_file(NORM_FILE)  # a run made before the stage saved its norm
    assert run_norm(store, DescribeConfig()) == reference_norm()


def test_a_saved_norm_grades_another_run_as_the_run_that_fitted_it(
    tmp_path, cohort: pa.Table
) -> None:
    source = RunStore(str(tmp_path / "source"))
    run_on(source, cohort)
    path = source.uri_of(NORM_FILE)
    other = RunStore(str(tmp_path / "other"))
    run_on(other, cohort, norm=path)
    assert other.read_json(NORM_FILE) == source.read_json(NORM_FILE)  # provenance kept
    for split in ("train", "test"):
        ours = other.read_table(f"splits/{split}.parquet").select(GRADES)
        assert ours.equals(source.read_table(f"splits/{split}.parquet").select(GRADES))

    edited = json.loads((tmp_path / "source" / NORM_FILE).read_text())
    edited["regions"]["Hippocampus"]["resid_sd"] *= 2
    (tmp_path / "source" / NORM_FILE).write_text(json.dumps(edited))
    with pytest.raises(StageConflict, match=r"versions\.norm"):
        describe_and_split(DescribeConfig(norm=path), SplitConfig(), other)
    with pytest.raises(CohortReadError, match="not found"):
        describe_and_split(DescribeConfig(norm=str(tmp_path / "nope.json")), SplitConfig(), other)


def test_a_served_patient_is_graded_with_the_runs_norm(tmp_path, cohort: pa.Table) -> None:
    store = RunStore(str(tmp_path))
    # Hippocampi measured 15% smaller than ADNI's: the reference grades them otherwise.
    run_on(store, scaled(cohort, 0.85, regions=("Hippocampus",)))
    cfg = DescribeConfig(norm="fitted")  # what serving reads from the splits stage's record
    norm = run_norm(store, cfg)
    test = store.read_table("splits/test.parquet").to_pylist()[:20]
    names = {c.name for c in SERVED_COLUMNS} - {"EXAMDATE"}  # a date is sent as text
    differs_from_reference = []
    for row in test:
        record = PatientRecord(**{k: v for k, v in row.items() if k in names and v is not None})
        served = describe_record(record, cfg, norm)
        assert served["description"][0].as_py() == row["description"]
        by_reference = describe_record(record, DescribeConfig(), reference_norm())
        differs_from_reference.append(by_reference["description"][0].as_py() != row["description"])
    assert any(differs_from_reference)
    with pytest.raises(ValueError, match="splits stage"):
        describe(store.read_table(COHORT_TABLE), cfg)  # no silent fallback to the reference


def test_too_few_cn_subjects_to_fit_is_an_error_naming_the_region() -> None:
    assert set(fit_norm(cn_baselines(40, fusiform_measured=FIT_MIN_SUBJECTS)).regions) == {
        "Hippocampus",
        "Fusiform",
    }
    with pytest.raises(CohortReadError, match=f"only {FIT_MIN_SUBJECTS - 1} .* Fusiform"):
        fit_norm(cn_baselines(40, fusiform_measured=FIT_MIN_SUBJECTS - 1))


def undescribed(table: pa.Table) -> pa.Table:
    """A split table without what the splits stage added."""
    added = [f"{kind}_{region}" for region in REGIONS for kind in ("z", "grade")]
    return table.drop_columns([*added, "description"])


def _digest(store: RunStore) -> str:
    record = read_record(store, COHORT_STAGE)
    assert record is not None and record.output_digest is not None
    return record.output_digest
