"""Patient descriptions: cohort rows -> text in the style of Kwon et al. (AAAI 2024).

"This patient is a 74-year-old female who has completed 16 years of education and
is married. The patient has a Mini-mental State Examination score of 27/30 and has
one copy of APOE4 gene. Also, based on their MRI scans:
- Atrophy of hippocampus: Mild ..."

MRI findings are graded No / Mild / Severe from z-scores of log volume against a
cognitively normal (CN) norm adjusted for ICV (head size), age and sex, chosen by
`DescribeConfig.norm`:
- `reference`: the published ADNI CN values of reference.yaml (sex enters through
  ICV only: sex differences vanish after ICV adjustment);
- `fitted`: fitted by the splits stage on the CN baseline visits of the cohort's own
  training split (`fit_norm`), so a cohort measured by another segmentation pipeline
  or scanner is graded against its own healthy controls, not against ADNI's numbers;
- the path of a saved norm (a run's splits/norm.json), to grade as that run did.
No row's label enters its own description, and no test subject enters a norm. Only
the columns in `FEATURE_COLUMNS` are ever read to describe.

Regions are those the cohort measures (ADNIMERGE: hippocampus, entorhinal,
fusiform, middle temporal, whole brain, ventricles); the paper's other regions
(amygdala, precuneus, ...) are not invented. Everything is vectorised with
pyarrow compute (1M rows in seconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from radiag.cohort.readers import CohortReadError
from radiag.cohort.reference import CohortReference, load_reference
from radiag.cohort.schema import Label
from radiag.config import StrictModel
from radiag.store import filesystem_for

FeatureBlock = Literal["demographics", "mmse", "apoe4", "cognitive_battery", "biomarkers", "mri"]
PAPER_FEATURES: tuple[FeatureBlock, ...] = ("demographics", "mmse", "apoe4", "mri")
GRADES = ("No", "Mild", "Severe")
DESCRIPTION_VERSION = "v1"  # a change to the description text is a new version (stage identity)
FIT_VERSION = "ols-v1"  # a change to how `fit_norm` fits is a new version (stage identity)
FIT_MIN_SUBJECTS = 10  # four coefficients and a residual sd need more CN subjects than this

# (column, bullet text); the order is the order of the bullets.
MRI_FINDINGS = (
    ("Hippocampus", "Atrophy of hippocampus"),
    ("Entorhinal", "Atrophy of entorhinal cortex"),
    ("Fusiform", "Atrophy of fusiform gyrus"),
    ("MidTemp", "Atrophy of middle temporal gyrus"),
    ("WholeBrain", "Overall brain atrophy"),
    ("Ventricles", "Ventricle enlargement"),
)
COGNITIVE_BATTERY = (
    ("CDRSB", "CDR-SB", 18),
    ("ADAS13", "ADAS-Cog 13", 85),
    ("FAQ", "FAQ", 30),
    ("MOCA", "MoCA", 30),
)
BIOMARKERS = (  # (column, text before the value, text after it)
    ("ABETA", "CSF amyloid-beta ", " pg/mL"),
    ("TAU", "CSF total tau ", " pg/mL"),
    ("PTAU", "CSF phosphorylated tau ", " pg/mL"),
    ("FDG", "FDG-PET ", ""),
    ("AV45", "florbetapir (AV45) SUVR ", ""),
)
FEATURE_COLUMNS = (
    "patient_id", "age_at_visit", "PTGENDER", "PTEDUCAT", "PTMARRY", "APOE4", "MMSE",
    *(c for c, _, _ in COGNITIVE_BATTERY), *(c for c, _, _ in BIOMARKERS), *(c for c, _ in MRI_FINDINGS), "ICV",
)  # fmt: skip
APOE4_TEXT = ("no", "one copy of", "two copies of")
BLOCK_COLUMNS: dict[FeatureBlock, tuple[str, ...]] = {
    "demographics": ("age_at_visit", "PTGENDER", "PTEDUCAT", "PTMARRY"),
    "mmse": ("MMSE",),
    "apoe4": ("APOE4",),
    "cognitive_battery": tuple(c for c, _, _ in COGNITIVE_BATTERY),
    "biomarkers": tuple(c for c, _, _ in BIOMARKERS),
    # graded against the CN norm at the patient's ICV, age and sex
    "mri": (*(c for c, _ in MRI_FINDINGS), "ICV", "age_at_visit", "PTGENDER"),
}
"""The columns each block of a description reads."""


class DescribeConfig(StrictModel):
    """Which facts a description states, and how MRI volumes are graded."""

    features: list[FeatureBlock] = Field(
        default_factory=lambda: list(PAPER_FEATURES),
        description="blocks to state; the paper's set is demographics, mmse, apoe4, mri",
    )
    mild_z: float = Field(1.0, gt=0, description="|z| from the CN norm at which a finding is Mild")
    severe_z: float = Field(2.0, gt=0, description="|z| at which it is Severe")
    norm: str = Field(
        "reference",
        min_length=1,
        description="the CN norm that grades MRI: reference (published ADNI values), fitted "
        "(on the training split's CN subjects), or the path of a saved norm (<run>/splits/norm.json)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> DescribeConfig:
        if self.severe_z <= self.mild_z:
            raise ValueError("severe_z must be larger than mild_z")
        if not self.features:
            raise ValueError("features must name at least one block")
        return self


@dataclass(frozen=True)
class Norm:
    """CN norm of one region: expected log volume at (ICV, age, sex) and residual sd.

    `female_shift` is the log-volume difference of women at the same ICV and age: 0 in
    the reference, fitted from the cohort otherwise.
    """

    log_mean: float
    icv_mean: float
    icv_exponent: float
    age_mean: float
    age_slope: float  # relative volume change per year of age
    resid_sd: float
    female_shift: float = 0.0

    def z(
        self, volume: np.ndarray, icv: np.ndarray, age: np.ndarray, female: np.ndarray
    ) -> np.ndarray:
        expected = self.log_mean + self.icv_exponent * np.log(icv / self.icv_mean)
        expected = expected + np.log1p(self.age_slope) * (age - self.age_mean)
        expected = expected + self.female_shift * female
        return (np.log(volume) - expected) / self.resid_sd


class NormativeModel(BaseModel):
    """The CN norm of every graded region and where it came from: splits/norm.json.

    A region without a norm is not graded (its grade is null, as for an unmeasured one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)  # a file that is no norm is refused

    kind: Literal["reference", "fitted"]
    method: str
    regions: dict[str, Norm]
    subjects: dict[str, int] = Field(
        default_factory=dict, description="fitted: CN subjects behind each region's norm"
    )
    fitted_by: dict[str, Any] = Field(
        default_factory=dict,
        description="fitted: the split fitted on, and the splits stage's identity and upstream",
    )


def cn_norms(ref: CohortReference) -> dict[str, Norm]:
    """Norms from the published CN statistics (reference.yaml), one per graded region."""
    cn = ref.groups[Label.CN]
    icv_mean, icv_sd = cn.volumes["ICV"]
    age_mean, age_sd = cn.age
    norms = {}
    for region, _ in MRI_FINDINGS:
        mean, sd = cn.volumes[region]
        total_sd = np.sqrt(np.log1p((sd / mean) ** 2))
        b, slope = ref.volume_exponent(region), ref.age_slope(region)
        explained = (b * icv_sd / icv_mean) ** 2 + (np.log1p(slope) * age_sd) ** 2
        resid_sd = float(np.sqrt(max(total_sd**2 - explained, (0.5 * total_sd) ** 2)))
        log_mean = float(np.log(mean) - total_sd**2 / 2)
        norms[region] = Norm(log_mean, icv_mean, b, age_mean, slope, resid_sd)
    return norms


def reference_norm(ref: CohortReference | None = None) -> NormativeModel:
    """The published reference (reference.yaml) as a normative model."""
    return NormativeModel(
        kind="reference",
        method="published ADNI CN statistics (reference.yaml)",
        regions=cn_norms(ref or load_reference()),
    )


def fit_norm(train: pa.Table) -> NormativeModel:
    """Per region, OLS of log volume on log ICV, age and sex over the CN baseline visits of
    a training split; the residual sd scales the z-score.

    Pass the training split only: the norm must never see a test subject. One visit per
    subject (the baseline), so a subject seen four times does not count four times.

    Raises:
        CohortReadError: too few CN baseline visits to fit (names the region and count).
    """
    cn = train.filter(
        pc.and_(pc.equal(train["label"], Label.CN.value), pc.equal(train["VISCODE"], "bl"))
    )
    icv = _numbers(cn["ICV"])
    age = _numbers(cn["age_at_visit"])
    female = _female(cn["PTGENDER"])
    known = (icv > 0) & np.isfinite(age)  # NaN compares False
    if not known.any():
        raise CohortReadError(
            "describe.norm fitted: no CN baseline visit of the training split has ICV and age; "
            "use describe.norm: reference or a saved norm"
        )
    icv_mean, age_mean = float(icv[known].mean()), float(age[known].mean())
    regions, subjects = {}, {}
    for region, _ in MRI_FINDINGS:
        volume = _numbers(cn[region])
        rows = known & (volume > 0)
        n = int(rows.sum())
        if n == 0:
            continue  # the cohort does not measure it in CN subjects: not graded
        if n < FIT_MIN_SUBJECTS:
            raise CohortReadError(
                f"describe.norm fitted: only {n} CN baseline visits of the training split have "
                f"{region} (need {FIT_MIN_SUBJECTS}); use describe.norm: reference or a saved norm"
            )
        design = np.column_stack(
            [np.ones(n), np.log(icv[rows] / icv_mean), age[rows] - age_mean, female[rows]]
        )  # (n, 4); a constant column (one sex only) leaves lstsq rank-deficient, not wrong
        target = np.log(volume[rows])
        coef, _, rank, _ = np.linalg.lstsq(design, target, rcond=None)
        residual = target - design @ coef
        resid_sd = float(np.sqrt(residual @ residual / max(n - rank, 1)))
        regions[region] = Norm(
            float(coef[0]), icv_mean, float(coef[1]), age_mean, float(np.expm1(coef[2])),
            resid_sd, float(coef[3]),
        )  # fmt: skip
        subjects[region] = n
    return NormativeModel(
        kind="fitted",
        method=f"OLS of log volume on log ICV, age and sex, CN baseline visits ({FIT_VERSION})",
        regions=regions,
        subjects=subjects,
    )


def load_norm(path: str) -> NormativeModel:
    """A saved normative model (a run's splits/norm.json), local or s3://.

    Raises:
        CohortReadError: the file is missing or is not a saved norm.
    """
    fs, inner = filesystem_for(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return NormativeModel.model_validate_json(stream.read())
    except FileNotFoundError:
        raise CohortReadError(
            f"describe.norm {path}: not found (give reference, fitted, or the path of a saved "
            "norm such as <run>/splits/norm.json)"
        ) from None
    except ValidationError as err:
        raise CohortReadError(f"describe.norm {path}: not a saved norm: {err}") from None


def configured_norm(cfg: DescribeConfig) -> NormativeModel:
    """The norm `cfg.norm` names, for any norm known without a training split."""
    if cfg.norm == "reference":
        return reference_norm()
    if cfg.norm == "fitted":
        raise ValueError(
            "describe.norm fitted is fitted by the splits stage on its training split: "
            "describe with that norm (splits/norm.json)"
        )
    return load_norm(cfg.norm)


def _numbers(column: pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64, NaN where null."""
    return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)


def _female(sex: pa.ChunkedArray) -> np.ndarray:
    """1 for women, 0 for men, 0.5 where sex is unknown (halfway between the two norms)."""
    female = pc.fill_null(pc.if_else(pc.equal(sex, "Female"), 1.0, 0.0), 0.5)
    return female.to_numpy(zero_copy_only=False)


def grade_mri(table: pa.Table, cfg: DescribeConfig, norm: NormativeModel) -> pa.Table:
    """z-score and grade (No / Mild / Severe, null if unmeasured) for every region.

    Atrophy is a volume below the norm; ventricle enlargement is a volume above it.
    """
    icv = _numbers(table["ICV"])
    age = _numbers(table["age_at_visit"])
    female = _female(table["PTGENDER"])
    columns = {}
    for region, _ in MRI_FINDINGS:
        region_norm = norm.regions.get(region)
        if region_norm is None:  # the norm has none: not graded, as an unmeasured region
            z = np.full(table.num_rows, np.nan)
        else:
            z = region_norm.z(_numbers(table[region]), icv, age, female)  # (rows,)
        abnormal = z if region == "Ventricles" else -z
        grade = np.where(abnormal >= cfg.severe_z, 2, np.where(abnormal >= cfg.mild_z, 1, 0))
        columns[f"z_{region}"] = pa.array(z, mask=np.isnan(z))
        columns[f"grade_{region}"] = pa.array(np.array(GRADES)[grade], mask=np.isnan(z))
    return pa.table(columns)


def _fmt(values: pa.ChunkedArray | pa.Array, decimals: int = 0) -> pa.Array:
    """Numbers as text: integers without ".0", others rounded."""
    rounded = pc.round(values, decimals)
    return pc.cast(pc.cast(rounded, pa.int64()) if decimals == 0 else rounded, pa.string())


def _join(parts: list[pa.Array], separator: str) -> pa.Array:
    """Join non-null parts row-wise; a row with no parts gives null.

    pyarrow 26's null_handling="skip" drops rows whose inputs are all null, so an
    empty, never-null first part keeps every row; its leading separator is cut off.
    """
    joined = pc.binary_join_element_wise("", *parts, separator, null_handling="skip")
    joined = pc.utf8_slice_codeunits(joined, len(separator))
    return pc.if_else(pc.equal(joined, ""), pa.scalar(None, pa.string()), joined)


def _wrap(prefix: str, body: pa.Array, suffix: str) -> pa.Array:
    """prefix + body + suffix where body is non-null, else null."""
    return pc.binary_join_element_wise(prefix, body, suffix, "")


def _sentence_demographics(t: pa.Table) -> pa.Array:
    sex = pc.if_else(pc.equal(t["PTGENDER"], "Female"), "female", "male")
    sex = pc.fill_null(sex, "person")
    age_text = _fmt(t["age_at_visit"])
    article = pc.if_else(
        pc.starts_with(pc.fill_null(age_text, ""), "8"), "an ", "a "
    )  # an 80-year-old
    age = pc.fill_null(_wrap("", age_text, "-year-old "), "")
    education = _wrap("has completed ", _fmt(t["PTEDUCAT"]), " years of education")
    marital = _wrap("is ", pc.utf8_lower(t["PTMARRY"]), "")
    who = pc.fill_null(_wrap(" who ", _join([education, marital], " and "), ""), "")
    return pc.binary_join_element_wise("This patient is ", article, age, sex, who, ".", "")


def _sentence_scores(t: pa.Table, blocks: list[FeatureBlock]) -> pa.Array:
    parts = []
    if "mmse" in blocks:
        parts.append(_wrap("a Mini-mental State Examination score of ", _fmt(t["MMSE"]), "/30"))
    if "apoe4" in blocks:
        apoe = pc.cast(t["APOE4"], pa.int64())
        copies = pc.take(pa.array(APOE4_TEXT), pc.if_else(pc.is_valid(apoe), apoe, None))
        parts.append(_wrap("", copies, " APOE4 gene"))
    return _wrap("The patient has ", _join(parts, " and has "), ".")


def _sentence_battery(t: pa.Table) -> pa.Array:
    parts = [_wrap(f"{name} ", _fmt(t[col], 1), f"/{top}") for col, name, top in COGNITIVE_BATTERY]
    return _wrap("Other cognitive and functional scores: ", _join(parts, ", "), ".")


def _sentence_biomarkers(t: pa.Table) -> pa.Array:
    parts = [_wrap(before, _fmt(t[col], 2), after) for col, before, after in BIOMARKERS]
    return _wrap("Biomarkers: ", _join(parts, ", "), ".")


def _block_mri(grades: pa.Table) -> pa.Array:
    bullets = [_wrap(f"- {text}: ", grades[f"grade_{region}"], "") for region, text in MRI_FINDINGS]
    body = _join(bullets, "\n")
    found = _wrap("Also, based on their MRI scans:\n", body, "")
    return pc.fill_null(found, "No MRI measurements are available.")


def described_columns(cfg: DescribeConfig) -> set[str]:
    """Every column a description under `cfg` reads: what a model that reads it can use."""
    return {column for block in cfg.features for column in BLOCK_COLUMNS[block]}


def describe(table: pa.Table, cfg: DescribeConfig, norm: NormativeModel | None = None) -> pa.Table:
    """Add `description` and the MRI `z_*` / `grade_*` columns to a cohort table.

    Only FEATURE_COLUMNS are read: the label, DX and DX_bl cannot reach the text.

    Args:
        table: cohort rows.
        cfg: what to state and how to grade.
        norm: the norm to grade with (the splits stage's fitted one, a run's saved one).
            Default: the one `cfg.norm` names, which must then not be `fitted`.
    """
    features = table.select(list(FEATURE_COLUMNS))
    grades = grade_mri(features, cfg, norm or configured_norm(cfg))
    sentences = []
    if "demographics" in cfg.features:
        sentences.append(_sentence_demographics(features))
    if {"mmse", "apoe4"} & set(cfg.features):
        sentences.append(_sentence_scores(features, cfg.features))
    if "cognitive_battery" in cfg.features:
        sentences.append(_sentence_battery(features))
    if "biomarkers" in cfg.features:
        sentences.append(_sentence_biomarkers(features))
    if "mri" in cfg.features:
        sentences.append(_block_mri(grades))
    description = pc.fill_null(
        _join(sentences, " "), "No information is available for this patient."
    )
    out = table
    for name in grades.column_names:
        out = out.append_column(name, grades[name])
    return out.append_column("description", description)
