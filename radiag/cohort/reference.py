"""Published cohort statistics (reference.yaml), typed.

The synthetic generator draws from them and `describe` grades MRI volumes against
the cognitively normal (CN) group, so both read the same numbers.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import yaml
from pydantic import BaseModel

from radiag.cohort.schema import Label

MeanSd = tuple[float, float]
REFERENCE_FILE = Path(__file__).with_name("reference.yaml")


class GroupStats(BaseModel):
    baseline_fraction: float
    age: MeanSd
    female: float
    education: MeanSd
    apoe4_alleles: tuple[float, float, float]
    mmse: MeanSd
    cdrsb: MeanSd
    adas13: MeanSd
    faq: MeanSd
    moca: MeanSd
    volumes: dict[str, MeanSd]
    biomarkers: dict[str, MeanSd]


class Dynamics(BaseModel):
    hippocampus_atrophy_per_year: dict[Label, float]
    ventricle_growth_per_year: dict[Label, float]
    mmse_change_per_year: dict[Label, float]
    cdrsb_change_per_year: dict[Label, float]
    adas13_change_per_year: dict[Label, float]
    conversion_per_year: dict[Label, float]


class Ageing(BaseModel):
    hippocampus_per_year: float
    ventricles_per_year: float
    cortex_per_year: float


class HeadSize(BaseModel):
    regional_exponent: float
    ventricles_exponent: float
    wholebrain_exponent: float
    male_icv_factor: float
    female_icv_factor: float


class SiteStats(BaseModel):
    """How another cohort's subjects differ from ADNI's: group shares and ages."""

    baseline_fraction: dict[Label, float]
    age: dict[Label, MeanSd]


class CohortReference(BaseModel):
    """Everything in reference.yaml; see that file for the source of each number."""

    sources: dict[str, str]
    groups: dict[Label, GroupStats]
    effect_sizes_vs_cn: dict[Label, dict[str, float]]
    wholebrain_icv_fraction: dict[Label, MeanSd]
    aibl: SiteStats
    inclusion_mmse: dict[Label, tuple[float, float]]
    dynamics: Dynamics
    ageing: Ageing
    head_size: HeadSize
    severity_loading: dict[str, float]
    label_noise: float
    availability: dict[str, float]
    marital_status: dict[str, float]

    def volume_exponent(self, region: str) -> float:
        """How a region's volume scales with ICV (volume ~ ICV^exponent)."""
        if region == "Ventricles":
            return self.head_size.ventricles_exponent
        if region == "WholeBrain":
            return self.head_size.wholebrain_exponent
        return self.head_size.regional_exponent

    def age_slope(self, region: str) -> float:
        """Relative volume change per year of age in healthy ageing."""
        if region == "Hippocampus":
            return self.ageing.hippocampus_per_year
        if region == "Ventricles":
            return self.ageing.ventricles_per_year
        return self.ageing.cortex_per_year


@cache
def load_reference(path: Path = REFERENCE_FILE) -> CohortReference:
    return CohortReference.model_validate(yaml.safe_load(path.read_text()))
