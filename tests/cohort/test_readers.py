"""Readers on real files written like the exports: ADNIMERGE, AIBL, any CSV + mapping."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from radiag.cohort.mapping import load_mapping
from radiag.cohort.readers import CohortReadError, read_adnimerge, read_aibl, read_mapped_csv
from radiag.cohort.schema import Visit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def adni() -> tuple[pd.DataFrame, pd.DataFrame]:
    result = read_adnimerge(FIXTURES / "ADNIMERGE_quirks.csv")
    return result.cohort.to_pandas().set_index("patient_id"), result.quarantine


def test_adnimerge_keeps_every_good_visit(adni) -> None:
    cohort, _ = adni
    assert sorted(cohort.index) == [
        "adni-2-bl", "adni-2-m06", "adni-3-bl", "adni-4-bl", "adni-4-m12", "adni-5-bl", "adni-6-bl",
    ]  # fmt: skip


def test_adnimerge_labels_follow_dx_then_baseline_dx_bl(adni) -> None:
    labels = adni[0]["label"]
    assert labels["adni-3-bl"] == "AD"  # DX "Dementia"
    assert labels["adni-4-m12"] == "AD"  # transition "MCI to Dementia": the current state
    assert labels["adni-5-bl"] == "CN"  # old-style "NL" (DX_bl SMC)
    assert labels["adni-6-bl"] == "MCI"  # no DX: DX_bl EMCI at the baseline visit
    assert pd.isna(labels["adni-2-m06"])  # no DX at a follow-up: kept, unlabeled


def test_adnimerge_quirks_are_parsed(adni) -> None:
    cohort, _ = adni
    assert cohort.loc["adni-2-bl", "ABETA"] == 1700  # ">1700" censored at the assay bound
    assert cohort.loc["adni-3-bl", "TAU"] == 80  # "<80"
    assert pd.isna(cohort.loc["adni-5-bl", "PTMARRY"])  # "Unknown" is not a category
    assert math.isnan(cohort.loc["adni-5-bl", "APOE4"])  # -4 is ADNI's missing code
    assert cohort.loc["adni-4-m12", "AGE"] == 67.5  # AGE stays the baseline age ...
    assert cohort.loc["adni-4-m12", "age_at_visit"] == pytest.approx(68.5)  # ... + Years_bl
    assert str(cohort.loc["adni-2-bl", "EXAMDATE"]) == "2005-09-08"


def test_adnimerge_bad_rows_are_quarantined_with_file_row_column_and_reason(adni) -> None:
    _, quarantine = adni
    found = {
        (row, column): reason
        for row, column, reason in quarantine[["row", "column", "reason"]].itertuples(index=False)
    }
    assert found[(9, "MMSE")] == "out of range [0, 30]"
    assert found[(10, "APOE4")] == "out of range [0, 2]"
    assert found[(11, "Hippocampus")] == "not a number"
    assert found[(12, "VISCODE")].startswith("duplicate visit")
    assert found[(13, "RID")] == "missing subject id (RID)"
    assert found[(14, "EXAMDATE")] == "not a date"
    assert found[(15, "PTGENDER")] == "not one of Male, Female"
    assert set(quarantine["file"]) == {str(FIXTURES / "ADNIMERGE_quirks.csv")}
    assert quarantine.loc[quarantine["row"] == 11, "value"].item() == "abc"


def test_aibl_exports_are_joined_on_rid_and_viscode() -> None:
    result = read_aibl(FIXTURES / "aibl")
    cohort = result.cohort.to_pandas().set_index("patient_id")
    assert sorted(cohort.index) == ["aibl-1-bl", "aibl-1-m18", "aibl-2-bl", "aibl-3-bl"]
    first = cohort.loc["aibl-1-bl"]
    assert (first["label"], first["PTGENDER"], first["MMSE"], first["APOE4"]) == (
        "CN",
        "Male",
        29,
        0,
    )
    assert first["AGE"] == 2007 - 1931
    assert cohort.loc["aibl-1-m18", "label"] == "MCI"
    assert cohort.loc["aibl-1-m18", "CDRSB"] == 1.0  # sum of the six CDR boxes
    assert cohort.loc["aibl-2-bl", "APOE4"] == 1 and cohort.loc["aibl-2-bl", "label"] == "AD"
    assert pd.isna(cohort.loc["aibl-3-bl", "label"])  # DXCURREN -4: kept, unlabeled
    assert math.isnan(cohort.loc["aibl-3-bl", "CDRSB"])  # all boxes -4
    bad = result.quarantine
    assert list(bad["column"]) == ["MMSE"] and "aibl_pdxconv" in bad["file"].item()


def test_any_csv_plugs_in_through_a_mapping_yaml() -> None:
    mapping = load_mapping(ROOT / "configs" / "mappings" / "example.yaml")
    result = read_mapped_csv(FIXTURES / "memoryclinic.csv", mapping)
    cohort = result.cohort.to_pandas().set_index("patient_id")
    assert sorted(cohort.index) == [
        "memoryclinic-101-bl",
        "memoryclinic-101-m12",
        "memoryclinic-102-bl",
        "memoryclinic-103-bl",
    ]
    assert cohort.loc["memoryclinic-101-bl", "Hippocampus"] == pytest.approx(6900)  # cm^3 -> mm^3
    assert cohort.loc["memoryclinic-101-m12", "AGE"] == pytest.approx(
        71
    )  # age at visit -> baseline
    assert cohort.loc["memoryclinic-102-bl", "label"] == "AD"
    assert pd.isna(cohort.loc["memoryclinic-103-bl", "label"])  # unmapped code: unlabeled
    assert result.quarantine[["row", "column"]].values.tolist() == [[6, "PTGENDER"]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "file not found"),
        (b"\x00\xff\xfe garbage \x00", "not a readable CSV"),
        (b"PTID,VISCODE\n011_S_0002,bl\n", "missing required column(s) RID"),
    ],
)
def test_an_unreadable_file_fails_with_one_clear_message(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "ADNIMERGE.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CohortReadError, match=re.escape(message)) as err:
        read_adnimerge(path)
    assert str(path) in str(err.value)


def test_every_ingested_row_is_a_valid_visit_record(adni) -> None:
    """The pydantic Visit (one record, e.g. a request) accepts what ingestion keeps and refuses the rest."""
    cohort, _ = adni
    for _, row in cohort.reset_index().iterrows():
        Visit.model_validate({k: (None if pd.isna(v) else v) for k, v in row.items()})
    with pytest.raises(ValidationError, match="MMSE"):
        Visit.model_validate(
            {"patient_id": "x-1-bl", "source": "x", "RID": 1, "VISCODE": "bl", "MMSE": 35}
        )
