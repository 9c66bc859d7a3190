"""Patient descriptions: the paper's template, MRI grades from CN norms, and no label leak."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from radiag.cohort.describe import DescribeConfig, cn_norms, describe
from radiag.cohort.reference import load_reference
from radiag.cohort.schema import COHORT_SCHEMA
from radiag.cohort.stages import IngestConfig, ingest
from radiag.store import RunStore

CN = load_reference().groups["CN"]


def visit(**values: object) -> dict[str, object]:
    """One cohort row: a CN-typical 76-year-old with every volume at the CN mean."""
    row: dict[str, object] = {name: None for name in COHORT_SCHEMA.names}
    row |= {"patient_id": "t-1-bl", "source": "t", "RID": 1, "VISCODE": "bl", "label": "CN"}
    row |= {"age_at_visit": CN.age[0], "PTGENDER": "Female", "PTEDUCAT": 16.0, "PTMARRY": "Married"}
    row |= {"APOE4": 1.0, "MMSE": 27.0, "ICV": CN.volumes["ICV"][0]}
    row |= {
        region: CN.volumes[region][0]
        for region in (
            "Hippocampus",
            "Entorhinal",
            "Fusiform",
            "MidTemp",
            "WholeBrain",
            "Ventricles",
        )
    }
    return row | values


def text(*rows: dict[str, object], **cfg: object) -> list[str]:
    table = pa.Table.from_pylist(list(rows), schema=COHORT_SCHEMA)
    return describe(table, DescribeConfig(**cfg))["description"].to_pylist()


def test_the_paper_template_in_full() -> None:
    assert text(visit())[0] == (
        "This patient is a 76-year-old female who has completed 16 years of education and is married. "
        "The patient has a Mini-mental State Examination score of 27/30 and has one copy of APOE4 gene. "
        "Also, based on their MRI scans:\n"
        "- Atrophy of hippocampus: No\n"
        "- Atrophy of entorhinal cortex: No\n"
        "- Atrophy of fusiform gyrus: No\n"
        "- Atrophy of middle temporal gyrus: No\n"
        "- Overall brain atrophy: No\n"
        "- Ventricle enlargement: No"
    )


def test_ages_in_the_eighties_take_an() -> None:
    assert text(visit(age_at_visit=84.2))[0].startswith("This patient is an 84-year-old female")


def test_missing_facts_are_left_out_not_invented() -> None:
    row = visit(PTEDUCAT=None, PTMARRY=None, APOE4=None, Fusiform=None, MidTemp=None)
    described = text(row)[0]
    assert described.startswith(
        "This patient is a 76-year-old female. The patient has a Mini-mental"
    )
    assert text(visit(age_at_visit=None, PTGENDER=None))[0].startswith(
        "This patient is a person who"
    )
    assert (
        "APOE4" not in described
        and "fusiform" not in described
        and "temporal gyrus" not in described
    )
    no_mri = {
        r: None
        for r in ("Hippocampus", "Entorhinal", "Fusiform", "MidTemp", "WholeBrain", "Ventricles")
    }
    assert text(visit(**no_mri))[0].endswith("No MRI measurements are available.")


@pytest.mark.parametrize(("sds_below", "grade"), [(0.0, "No"), (1.5, "Mild"), (3.0, "Severe")])
def test_hippocampal_atrophy_is_graded_by_z_score_against_the_cn_norm(
    sds_below: float, grade: str
) -> None:
    norm = cn_norms(load_reference())["Hippocampus"]
    volume = float(np.exp(norm.log_mean - sds_below * norm.resid_sd))
    assert f"- Atrophy of hippocampus: {grade}\n" in text(visit(Hippocampus=volume))[0]


def test_grades_are_adjusted_for_head_size_and_age() -> None:
    small = 5600.0  # the same hippocampus ...
    in_small_old_head = visit(Hippocampus=small, ICV=1.25e6, age_at_visit=88.0)
    in_large_young_head = visit(Hippocampus=small, ICV=1.8e6, age_at_visit=62.0)
    first, second = text(in_small_old_head, in_large_young_head)
    assert "hippocampus: No" in first or "hippocampus: Mild" in first
    assert "hippocampus: Severe" in second


def test_large_ventricles_are_enlargement_not_atrophy() -> None:
    assert "- Ventricle enlargement: Severe" in text(visit(Ventricles=120_000.0))[0]
    assert "- Ventricle enlargement: No" in text(visit(Ventricles=15_000.0))[0]


def test_feature_sets_select_what_is_stated() -> None:
    row = visit(CDRSB=1.5, ADAS13=20.33, ABETA=650.0)
    no_cognition = text(row, features=["demographics", "apoe4", "mri"])[0]
    assert "Mini-mental" not in no_cognition and "one copy of APOE4" in no_cognition
    everything = text(
        row, features=["demographics", "mmse", "apoe4", "cognitive_battery", "biomarkers", "mri"]
    )[0]
    assert "CDR-SB 1.5/18, ADAS-Cog 13 20.3/85" in everything
    assert "CSF amyloid-beta 650 pg/mL" in everything


def test_no_description_depends_on_the_label(tmp_path) -> None:
    """Label leak guard: shuffle label, DX and DX_bl across rows: every text stays identical."""
    store = RunStore(str(tmp_path))
    ingest(IngestConfig(), store)
    cohort = store.read_table("cohort/cohort.parquet")
    cfg = DescribeConfig(
        features=["demographics", "mmse", "apoe4", "cognitive_battery", "biomarkers", "mri"]
    )
    original = describe(cohort, cfg)["description"]
    rng = np.random.default_rng(0)
    shuffled = cohort
    for name in ("label", "DX", "DX_bl"):
        column = shuffled[name].take(rng.permutation(cohort.num_rows))
        shuffled = shuffled.set_column(shuffled.schema.get_field_index(name), name, column)
    assert describe(shuffled, cfg)["description"].equals(original)
    words = " ".join(original.to_pylist()[:500]).lower()
    for leak in ("dementia", "alzheimer", "mci", "cognitively normal", "diagnos"):
        assert leak not in words
