"""A synthetic cohort calibrated to published ADNI statistics (reference.yaml).

Real ADNI/AIBL exports sit behind data-use agreements, so everything runs on this
cohort by default. It is ADNIMERGE-shaped (same columns, codes and quirks: DX vs
DX_bl, censored CSF strings such as ">1700", "Unknown" marital status, missing
values, age at baseline plus Years_bl), so the real reader path is exercised.

Generative story, per subject:
  latent stage at baseline (CN/MCI/AD) -> demographics, APOE4, ICV by sex
  -> a within-group severity factor shared by cognition, volumes and biomarkers
  -> volumes scaled with ICV^b and age -> yearly change and conversion at follow-up
  -> the recorded diagnosis, which disagrees with the latent stage at `label_noise`.
Published volume statistics are by recorded diagnosis, so the latent stages' volumes
are set to give those per recorded group (group means, sds and Cohen's d as published).
Everything is vectorised over subjects and visits (1M subjects in seconds).

`SynthConfig.site` draws another site's cohort instead (another group mix and ages,
volumes on another scanner's scale, some regions not measured), ADNIMERGE-shaped too
and read with `export_mapping`, for evaluating models across cohorts.
"""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
from pydantic import Field, model_validator

from radiag.cohort.mapping import ColumnMapping, bundled_mapping
from radiag.cohort.reference import CohortReference, load_reference
from radiag.cohort.schema import COLUMN_BY_NAME, NUMERIC_COLUMNS, VOLUME_COLUMNS, Label
from radiag.config import StrictModel

GROUPS = (Label.CN, Label.MCI, Label.AD)  # index = latent stage
REGIONS = ("Hippocampus", "Ventricles", "WholeBrain", "Entorhinal", "Fusiform", "MidTemp")
VISITS = (("bl", 0.0), ("m06", 0.5), ("m12", 1.0), ("m24", 2.0), ("m36", 3.0), ("m48", 4.0))
DX_TEXT = np.array(["CN", "MCI", "Dementia"])
# CSF assays report values beyond their range as censored strings (ADNIMERGE).
CENSOR_BOUNDS = {"ABETA": (200.0, 1700.0), "TAU": (80.0, 1300.0), "PTAU": (8.0, 120.0)}
# Measurement noise per visit, in the measure's units (approx test-retest).
VISIT_NOISE = {"MMSE": 1.0, "CDRSB": 0.4, "ADAS13": 2.5, "FAQ": 1.0, "MOCA": 1.2}


class SiteConfig(StrictModel):
    """Another site's cohort, for cross-cohort (transfer) evaluation: how it differs from ADNI.

    Its subjects are drawn with another group mix and other ages (by default AIBL's
    inception cohort, reference.yaml `aibl`); its scanner and pipeline measure each
    volume on another scale (`volume_scale`); some regions it does not measure at all,
    so their columns are absent from its export (`missing_regions`). Its RIDs start at
    `first_rid`, above any main cohort's 1..subjects (up to 10M subjects).
    """

    source: str = Field(
        "site2", pattern=r"^[a-z0-9_]+$", description="cohort name, part of every patient_id"
    )
    site_codes: tuple[int, int] = Field(
        (901, 901), description="first and last PTID site code; subjects spread over them"
    )
    first_rid: int = Field(10_000_001, ge=1, le=10**8, description="RID of the first subject")
    baseline_fraction: dict[Label, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(load_reference().aibl.baseline_fraction),
        description="share of each group at baseline",
    )
    age: dict[Label, tuple[float, float]] = Field(
        default_factory=lambda: dict(load_reference().aibl.age),
        description="[mean, sd] of age at baseline per group",
    )
    volume_scale: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {
            "Hippocampus": 1.1,
            "Ventricles": 0.9,
            "WholeBrain": 1.04,
            "ICV": 0.92,
        },
        description="factor on each volume as this site measures it (unlisted: 1); the default"
        " is illustrative: another scanner and pipeline segment the hippocampus larger and"
        " estimate ICV smaller",
    )
    missing_regions: tuple[str, ...] = Field(
        ("Entorhinal", "Fusiform", "MidTemp"), description="volumes this site does not export"
    )

    @model_validator(mode="after")
    def _consistent(self) -> SiteConfig:
        unknown = {*self.volume_scale, *self.missing_regions} - set(VOLUME_COLUMNS)
        if unknown:
            raise ValueError(f"not volume columns: {sorted(unknown)}")
        if not 1 <= self.site_codes[0] <= self.site_codes[1] <= 999:
            raise ValueError("site_codes must be [first, last] within 1..999")
        if set(self.baseline_fraction) != set(GROUPS) or set(self.age) != set(GROUPS):
            raise ValueError("baseline_fraction and age need CN, MCI and AD")
        return self


def _adni_site(ref: CohortReference) -> SiteConfig:
    """ADNI itself as a site: the reference's groups, 150 sites, volumes as published."""
    return SiteConfig(
        source="adni",
        site_codes=(2, 151),
        first_rid=1,
        baseline_fraction={g: ref.groups[g].baseline_fraction for g in GROUPS},
        age={g: ref.groups[g].age for g in GROUPS},
        volume_scale={},
        missing_regions=(),
    )


class SynthConfig(StrictModel):
    """Parameters of `generate_cohort`."""

    subjects: int = Field(1000, ge=1, description="number of subjects (RIDs)")
    max_visits: int = Field(
        4, ge=1, le=len(VISITS), description="visits per subject: bl, m06, m12, m24, ..."
    )
    visit_retention: float = Field(
        0.85, ge=0, le=1, description="chance each follow-up visit happens (dropout is permanent)"
    )
    label_noise: float | None = Field(
        None,
        ge=0,
        le=0.3,
        description="override reference.yaml label_noise (beyond 0.3 a group is mostly neighbours)",
    )
    seed: int = Field(0, description="seed of the generator; same seed, same cohort")
    site: SiteConfig | None = Field(
        None, description="draw another site's cohort (transfer evaluation); none: ADNI's"
    )


def export_mapping(cfg: SynthConfig) -> ColumnMapping:
    """How the CSV of `generate_cohort(cfg)` is read: ADNIMERGE's mapping, under the site's name."""
    adnimerge = bundled_mapping("adnimerge")
    return (
        adnimerge if cfg.site is None else adnimerge.model_copy(update={"source": cfg.site.source})
    )


def export_csv(cohort: pd.DataFrame) -> bytes:
    """The cohort as the bytes of its ADNIMERGE-shaped CSV export, as `radiag ingest` writes it.

    Written by Arrow, 10x faster than `DataFrame.to_csv` (1M subjects: 2 s, not 20): text
    in quotes, numbers in their shortest exact form ("16", not "16.0"), missing empty. The
    reader gives the same canonical cohort from either.
    """
    sink = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pandas(cohort, preserve_index=False), sink)
    return sink.getvalue()


def _pick(values: dict[Label, float] | list[float], stage: np.ndarray) -> np.ndarray:
    """Per-row value of a per-group table, indexed by latent stage."""
    table = np.array([values[g] for g in GROUPS] if isinstance(values, dict) else values)
    return table[stage]


def _group_stat(ref: CohortReference, getter, stage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, sd) per row of a group statistic selected by `getter(GroupStats)`."""
    pairs = np.array([getter(ref.groups[g]) for g in GROUPS], dtype=float)  # (3, 2)
    return pairs[stage, 0], pairs[stage, 1]


def _recorded_mixture(fractions: np.ndarray, label_noise: float) -> np.ndarray:
    """P(latent stage | recorded label) at baseline, (recorded 3, latent 3).

    A recorded label moves to an adjacent class at `label_noise` (both ways from MCI).
    """
    e = label_noise
    flip = np.array([[1 - e, e, 0], [e / 2, 1 - e, e / 2], [0, e, 1 - e]])  # latent -> recorded
    joint = fractions[:, None] * flip  # (latent, recorded)
    return (joint / joint.sum(axis=0)).T


def _latent_log_moments(
    ref: CohortReference, region: str, mixture: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Log-mean and log-sd per latent stage that give the published moments per recorded group.

    Published statistics are by recorded diagnosis, which mixes in neighbouring stages
    at the label-noise rate: drawing latent stages at the published values would shrink
    every group difference (Cohen's d) by that mixing, so the mixing is inverted.
    """
    mean, sd = np.array([ref.groups[g].volumes[region] for g in GROUPS], dtype=float).T
    log_var = np.log1p((sd / mean) ** 2)
    log_mean = np.log(mean) - log_var / 2
    latent_mean = np.linalg.solve(mixture, log_mean)
    between = (mixture * (latent_mean[None, :] - log_mean[:, None]) ** 2).sum(axis=1)
    latent_var = np.linalg.solve(mixture, log_var - between)
    return latent_mean, np.sqrt(latent_var)


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row from row-wise probabilities (N, K) by inverse CDF."""
    cumulative = np.cumsum(probs, axis=1)
    return (rng.random(len(probs))[:, None] > cumulative[:, :-1]).sum(axis=1)


def generate_cohort(cfg: SynthConfig, reference: CohortReference | None = None) -> pd.DataFrame:
    """Draw an ADNIMERGE-shaped visit table (one row per subject visit) of ADNI or `cfg.site`."""
    ref = reference or load_reference()
    rng = np.random.default_rng(cfg.seed)
    n = cfg.subjects
    label_noise = ref.label_noise if cfg.label_noise is None else cfg.label_noise
    site = cfg.site or _adni_site(ref)

    # --- subjects -------------------------------------------------------------
    fractions = np.array([site.baseline_fraction[g] for g in GROUPS])
    fractions = fractions / fractions.sum()
    stage0 = rng.choice(3, size=n, p=fractions)
    site_age = np.array([site.age[g] for g in GROUPS])[stage0]  # (n, 2)
    age = np.clip(rng.normal(site_age[:, 0], site_age[:, 1]), 55, 92)
    age_mean, age_sd = _group_stat(ref, lambda s: s.age, stage0)  # volumes age from ADNI's
    female = rng.random(n) < _pick([ref.groups[g].female for g in GROUPS], stage0)
    edu_mean, edu_sd = _group_stat(ref, lambda s: s.education, stage0)
    education = np.clip(np.round(rng.normal(edu_mean, edu_sd)), 6, 20)
    apoe_probs = np.array([ref.groups[g].apoe4_alleles for g in GROUPS])[stage0]
    apoe4 = _categorical(rng, apoe_probs).astype(float)
    marital_names = np.array(list(ref.marital_status))
    marital_p = np.array(list(ref.marital_status.values()))
    marital = marital_names[rng.choice(len(marital_names), size=n, p=marital_p / marital_p.sum())]
    severity = rng.standard_normal(n)  # within-group, shared by all measures

    # ICV by sex; the group sd includes the sex difference, so remove it within sex.
    icv_mean, icv_sd = _group_stat(ref, lambda s: s.volumes["ICV"], stage0)
    hs = ref.head_size
    female_share = _pick([ref.groups[g].female for g in GROUPS], stage0)
    mean_factor = female_share * hs.female_icv_factor + (1 - female_share) * hs.male_icv_factor
    # Normalised by the group's sex mix, so the group mean stays the published one.
    sex_factor = np.where(female, hs.female_icv_factor, hs.male_icv_factor) / mean_factor
    within_sex_sd = np.sqrt(np.maximum(icv_sd**2 - ((1 - hs.female_icv_factor) * icv_mean) ** 2, 1))
    icv = rng.normal(icv_mean * sex_factor, within_sex_sd)

    # --- visits: explode subjects x visit schedule, with permanent dropout ------
    attended = np.ones((n, cfg.max_visits), dtype=bool)
    attended[:, 1:] = np.cumprod(rng.random((n, cfg.max_visits - 1)) < cfg.visit_retention, axis=1)
    subj, visit = np.nonzero(attended)  # (rows,), subject-major order
    years = np.array([t for _, t in VISITS])[visit]
    rows = len(subj)

    # Conversion (CN->MCI, MCI->AD) at an exponential time after baseline.
    p_convert = _pick(ref.dynamics.conversion_per_year, stage0)
    rate = -np.log1p(-np.minimum(p_convert, 0.999))
    convert_at = np.where(rate > 0, rng.exponential(1 / np.maximum(rate, 1e-9), n), np.inf)
    converted = years >= convert_at[subj]
    s0 = stage0[subj]
    stage = np.minimum(s0 + converted, 2)

    sev = severity[subj]
    load = ref.severity_loading
    frame: dict[str, object] = {}

    # --- cognition ---------------------------------------------------------------
    def cognition(
        name: str, getter, sign: float, low: float, high: float, step: float
    ) -> np.ndarray:
        mean, sd = _group_stat(ref, getter, s0)
        new_mean, _ = _group_stat(ref, getter, stage)
        base = mean + sign * load["cognition"] * sd * sev
        resid_sd = sd * np.sqrt(max(1 - load["cognition"] ** 2, 0.05))
        value = base + resid_sd * rng.standard_normal(n)[subj]
        change = getattr(ref.dynamics, f"{name.lower()}_change_per_year", None)
        if change is not None:
            value = value + _pick(change, s0) * years
        value = (
            value + 0.5 * (new_mean - mean) * converted
        )  # a converter moves toward the new group
        value = value + VISIT_NOISE[name] * rng.standard_normal(rows) * (years > 0)
        return np.clip(np.round(value / step) * step, low, high) + 0.0  # no "-0.0"

    mmse = cognition("MMSE", lambda s: s.mmse, -1, 0, 30, 1)
    inclusion = np.array([ref.inclusion_mmse[g] for g in GROUPS])[s0]  # (rows, 2)
    baseline = years == 0
    mmse[baseline] = np.clip(mmse[baseline], inclusion[baseline, 0], inclusion[baseline, 1])
    cdrsb = cognition("CDRSB", lambda s: s.cdrsb, +1, 0, 18, 0.5)
    cdrsb[baseline & (s0 > 0)] = np.maximum(cdrsb[baseline & (s0 > 0)], 0.5)  # CDR 0.5+ at entry
    frame.update(
        MMSE=mmse,
        CDRSB=cdrsb,
        ADAS13=np.round(cognition("ADAS13", lambda s: s.adas13, +1, 0, 85, 1 / 3), 2),
        FAQ=cognition("FAQ", lambda s: s.faq, +1, 0, 30, 1),
        MOCA=cognition("MOCA", lambda s: s.moca, -1, 0, 30, 1),
    )

    # --- volumes: log-normal, ICV^b, age, severity, atrophy over follow-up -------
    icv_log_sd = np.sqrt(np.log1p((icv_sd / icv_mean) ** 2))
    icv_rel_log = (np.log(icv) - np.log(icv_mean) + icv_log_sd**2 / 2)[subj]  # mean 0
    age_dev = (age - age_mean)[subj]  # from the reference's mean age: a younger site differs
    hippo_rate = _pick(ref.dynamics.hippocampus_atrophy_per_year, s0)
    # Latent volumes are calibrated on ADNI's group mix: another site's mix changes who
    # is recorded where, not what a disease stage does to the brain.
    adni = np.array([ref.groups[g].baseline_fraction for g in GROUPS])
    mixture = _recorded_mixture(adni / adni.sum(), label_noise)
    for region in REGIONS:
        latent_mean, latent_sd = _latent_log_moments(ref, region, mixture)
        log_mean, log_sd = latent_mean[s0], latent_sd[s0]
        b, slope = ref.volume_exponent(region), ref.age_slope(region)
        # Head size and age take their share of the group's variance; the shared severity
        # factor takes `load^2` of what is left, independent noise the rest.
        head, ageing = b * icv_log_sd[subj], np.log1p(slope) * age_sd[subj]
        left = np.maximum(log_sd**2 - head**2 - ageing**2, 0.0)
        sign = 1.0 if region == "Ventricles" else -1.0
        log_vol = (
            log_mean
            + b * icv_rel_log
            + np.log1p(slope) * age_dev
            + sign * load["volumes"] * np.sqrt(left) * sev
            + np.sqrt(left * (1 - load["volumes"] ** 2)) * rng.standard_normal(n)[subj]
        )
        if region == "Ventricles":
            yearly = np.log1p(_pick(ref.dynamics.ventricle_growth_per_year, s0))
        else:  # hippocampus at its group rate, cortex at half of it (approx)
            yearly = np.log1p(-hippo_rate * (1.0 if region == "Hippocampus" else 0.5))
        log_vol = log_vol + yearly * years + 0.015 * rng.standard_normal(rows) * (years > 0)
        frame[region] = np.round(np.exp(log_vol) * site.volume_scale.get(region, 1.0))
    icv_measured = icv[subj] * np.exp(0.005 * rng.standard_normal(rows))
    frame["ICV"] = np.round(icv_measured * site.volume_scale.get("ICV", 1.0))

    # --- fluid and PET biomarkers --------------------------------------------------
    for marker in ("ABETA", "TAU", "PTAU", "FDG", "AV45"):
        mean, sd = _group_stat(ref, lambda s, m=marker: s.biomarkers[m], stage)
        sign = -1.0 if marker in ("ABETA", "FDG") else 1.0
        value = mean + sign * load["biomarkers"] * sd * sev + sd * 0.9 * rng.standard_normal(rows)
        frame[marker] = np.round(
            np.maximum(value, 0.05 * mean), 3 if marker in ("FDG", "AV45") else 1
        )

    # --- recorded diagnosis: latent stage with label noise to an adjacent class ----
    flip = rng.random(rows) < label_noise
    step = np.where(stage == 0, 1, np.where(stage == 2, -1, rng.choice([-1, 1], size=rows)))
    recorded = np.where(flip, stage + step, stage)
    dx = DX_TEXT[recorded].astype(object)
    dx[(years > 0) & (rng.random(rows) < 0.03)] = None  # some follow-ups carry no diagnosis
    bl_code = np.where(
        recorded == 0,
        np.where(rng.random(rows) < 0.1, "SMC", "CN"),
        np.where(recorded == 2, "AD", np.where(sev > 0, "LMCI", "EMCI")),
    )
    first_row = np.r_[0, np.flatnonzero(np.diff(subj)) + 1]  # baseline row of each subject
    dx_bl = bl_code[first_row][np.repeat(np.arange(n), np.diff(np.r_[first_row, rows]))]

    rid = np.arange(site.first_rid, site.first_rid + n)
    first_code, last_code = site.site_codes
    site_code = first_code + rid % (last_code - first_code + 1)
    base_day = np.datetime64("2005-09-01") + rng.integers(0, 2700, n).astype("timedelta64[D]")
    examdate = base_day[subj] + np.round(years * 365.25).astype("timedelta64[D]")

    table = pd.DataFrame(
        {
            "RID": rid[subj],
            "PTID": pd.Series(
                [f"{s:03d}_S_{r:04d}" for s, r in zip(site_code, rid, strict=True)]
            ).to_numpy(dtype=object)[subj],
            "VISCODE": np.array([code for code, _ in VISITS], dtype=object)[visit],
            "EXAMDATE": examdate.astype("datetime64[D]").astype(str),
            "DX_bl": dx_bl,
            "DX": dx,
            "AGE": np.round(age, 1)[subj],
            "PTGENDER": np.where(female, "Female", "Male")[subj],
            "PTEDUCAT": education[subj],
            "PTMARRY": marital[subj],
            "APOE4": apoe4[subj],
            **frame,
            "Years_bl": years,
        }
    )
    _clip_to_plausible_ranges(table)
    _apply_missingness(table, ref, rng)
    _censor_csf(table)
    return table.drop(columns=list(site.missing_regions))


def _clip_to_plausible_ranges(table: pd.DataFrame) -> None:
    """Keep far tails inside the schema's plausible ranges: the generator writes no bad rows."""
    for name in table.columns:
        column = COLUMN_BY_NAME.get(name)
        if column is not None and column.low is not None and name in NUMERIC_COLUMNS:
            table[name] = table[name].clip(column.low, column.high)


def _apply_missingness(table: pd.DataFrame, ref: CohortReference, rng: np.random.Generator) -> None:
    """Blank out measures at the rates of `availability` (not every visit has every test)."""
    for column, available in ref.availability.items():
        missing = rng.random(len(table)) >= available
        table.loc[missing, column] = np.nan


def _censor_csf(table: pd.DataFrame) -> None:
    """Write CSF values beyond assay range as ADNIMERGE does: ">1700", "<200"."""
    for column, (low, high) in CENSOR_BOUNDS.items():
        values = table[column].to_numpy()
        text = (
            pd.Series(values)
            .map(lambda v: None if np.isnan(v) else f"{v:g}")
            .to_numpy(dtype=object)
        )
        text[values > high] = f">{high:g}"
        text[values < low] = f"<{low:g}"
        table[column] = text
