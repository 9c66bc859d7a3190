"""A synthetic external site (`SynthConfig.site`) differs from the ADNI-like cohort the
way another study does, and reads through the ADNIMERGE path under its own name."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from radiag.cohort.readers import read_csv_rows
from radiag.cohort.reference import load_reference
from radiag.cohort.stages import COHORT_TABLE, IngestConfig, ingest
from radiag.cohort.synthetic import SiteConfig, SynthConfig, export_mapping, generate_cohort
from radiag.cohort.validate import canonicalize
from radiag.store import RunStore

REF = load_reference()
SITE = SynthConfig(subjects=3000, max_visits=2, seed=4, site=SiteConfig())


@pytest.fixture(scope="module")
def site_cohort() -> pd.DataFrame:
    return generate_cohort(SITE)


def baseline_ages(cohort: pd.DataFrame) -> pd.Series:
    """Mean baseline age per recorded diagnosis (DX)."""
    return cohort[cohort["VISCODE"] == "bl"].groupby("DX")["AGE"].mean()


def test_the_site_is_read_as_its_own_cohort_through_the_adnimerge_path(
    site_cohort: pd.DataFrame,
) -> None:
    export = io.BytesIO(site_cohort.to_csv(index=False).encode())
    result = canonicalize(read_csv_rows("site2.csv", content=export), export_mapping(SITE))
    assert len(result.quarantine) == 0 and result.cohort.num_rows == len(site_cohort)
    assert set(result.cohort.column("source").to_pylist()) == {"site2"}
    assert all(p.startswith("site2-") for p in result.cohort.column("patient_id").to_pylist())
    assert export_mapping(SynthConfig()).source == "adni"  # the main cohort keeps its name


def test_site_subjects_never_share_an_id_with_the_main_cohort(site_cohort: pd.DataFrame) -> None:
    main = generate_cohort(SynthConfig(subjects=3000, max_visits=2, seed=4))
    assert not set(main["RID"]) & set(site_cohort["RID"])
    assert not set(main["PTID"]) & set(site_cohort["PTID"])
    assert site_cohort["PTID"].str.startswith("901_S_").all()


def test_the_site_measures_each_volume_on_its_own_scale(site_cohort: pd.DataFrame) -> None:
    """Same subjects, scaled and unscaled: each volume differs by exactly its factor."""
    scaled = site_cohort
    unscaled = generate_cohort(SITE.model_copy(update={"site": SiteConfig(volume_scale={})}))
    for region, factor in SITE.site.volume_scale.items():
        ratio = (scaled[region] / unscaled[region]).dropna()
        assert ratio.to_numpy() == pytest.approx(factor, rel=1e-3), region
    pd.testing.assert_series_equal(scaled["MMSE"], unscaled["MMSE"])


def test_the_site_has_aibls_group_mix_and_ages(site_cohort: pd.DataFrame) -> None:
    baseline = site_cohort[site_cohort["VISCODE"] == "bl"]
    share_cn = (baseline["DX"] == "CN").mean()
    assert share_cn == pytest.approx(REF.aibl.baseline_fraction["CN"], abs=0.05)  # ADNI: 0.28
    ages = baseline_ages(site_cohort)
    adni_ages = baseline_ages(generate_cohort(SynthConfig(subjects=3000, max_visits=1, seed=4)))
    assert ages["CN"] == pytest.approx(REF.aibl.age["CN"][0], abs=1.0)
    assert ages["Dementia"] == pytest.approx(REF.aibl.age["AD"][0], abs=1.0)
    assert adni_ages["CN"] - ages["CN"] > 4  # controls younger than ADNI's
    assert ages["Dementia"] - adni_ages["Dementia"] > 1.5  # AD patients older


def test_regions_the_site_does_not_measure_are_absent_and_read_as_missing(
    site_cohort: pd.DataFrame,
) -> None:
    missing = set(SITE.site.missing_regions)
    assert missing == {"Entorhinal", "Fusiform", "MidTemp"}
    assert not missing & set(site_cohort.columns)
    assert {"Hippocampus", "Ventricles", "WholeBrain", "ICV"} <= set(site_cohort.columns)
    export = io.BytesIO(site_cohort.to_csv(index=False).encode())
    cohort = canonicalize(read_csv_rows("site2.csv", content=export), export_mapping(SITE)).cohort
    for region in missing:
        assert cohort.column(region).null_count == cohort.num_rows, region
    assert cohort.column("Hippocampus").null_count < cohort.num_rows


@pytest.mark.parametrize(
    "bad",
    [
        {"volume_scale": {"Hipocampus": 1.1}},
        {"volume_scale": {"ICV": 0.0}},
        {"missing_regions": ("MMSE",)},
        {"baseline_fraction": {"CN": 1.0}},
        {"site_codes": (950, 901)},
    ],
)
def test_a_site_config_that_cannot_be_drawn_is_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        SiteConfig(**bad)


def test_the_cohort_stage_ingests_a_synthetic_site_under_its_own_name(tmp_path: Path) -> None:
    store = RunStore(str(tmp_path / "run"))
    ingest(IngestConfig(synthetic=SynthConfig(subjects=30, max_visits=1, site=SiteConfig())), store)
    cohort = store.read_table(COHORT_TABLE)
    assert set(cohort.column("source").to_pylist()) == {"site2"}
