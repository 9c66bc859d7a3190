"""Subject-level splits: every visit of a subject (RID) lands in the same split.

Splitting by visit row would put a subject's m06 visit in train and its m12 visit
in test, and a model would be graded on people it has already seen. Subjects are
stratified by their baseline label (the label of their earliest labeled visit),
shuffled with a fixed seed, and the assignment is saved with the split tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from radiag.config import StrictModel
from radiag.errors import UserError

SPLITS = ("train", "val", "test")


class NoImagedVisitsError(UserError, ValueError):
    """`visits: imaged` asked for, and no visit has a T1."""


class SplitConfig(StrictModel):
    """Fractions of subjects per split (they must sum to 1) and the seed."""

    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.2, ge=0, le=1)
    seed: int = 0
    visits: str = Field(
        "all",
        pattern="^(all|baseline|imaged)$",
        description="keep all visits, baseline only, or only those with a T1 (`mri_path`): "
        "the modality arms are then scored on every test visit",
    )

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        if abs(self.train + self.val + self.test - 1) > 1e-6:
            raise ValueError(
                f"train + val + test must be 1, got {self.train + self.val + self.test:g}"
            )
        return self


def assign_subjects(cohort: pa.Table, cfg: SplitConfig) -> pd.DataFrame:
    """One row per subject: RID, stratum (baseline label or 'unlabeled'), split."""
    visits = cohort.select(["RID", "Years_bl", "label"]).to_pandas()
    labeled = visits.dropna(subset=["label"]).sort_values(["RID", "Years_bl"], kind="stable")
    stratum = labeled.groupby("RID")["label"].first()
    subjects = pd.DataFrame({"RID": np.sort(visits["RID"].unique())})
    subjects["stratum"] = subjects["RID"].map(stratum).fillna("unlabeled")

    rng = np.random.default_rng(cfg.seed)
    subjects["split"] = ""
    bounds = np.cumsum([cfg.train, cfg.val])
    for _, members in subjects.groupby("stratum", sort=True):
        order = rng.permutation(members.index.to_numpy())
        # Largest-remainder cut points: each split gets its share of this stratum.
        cuts = np.round(bounds * len(order)).astype(int)
        for name, chunk in zip(SPLITS, np.split(order, cuts), strict=True):
            subjects.loc[chunk, "split"] = name
    return subjects


def split_cohort(cohort: pa.Table, cfg: SplitConfig) -> tuple[dict[str, pa.Table], pd.DataFrame]:
    """Split a (described) cohort table by subject; returns the tables and the assignment."""
    if cfg.visits == "baseline":
        cohort = cohort.filter(pc.equal(cohort["VISCODE"], "bl"))
    if cfg.visits == "imaged":
        cohort = cohort.filter(pc.is_valid(cohort["mri_path"]))
        if cohort.num_rows == 0:
            raise NoImagedVisitsError(
                "split.visits is 'imaged' but no visit has a T1 (mri_path): run the mri "
                "stage (`mri.subjects`) or read an export whose mri_path is filled"
            )
    assignment = assign_subjects(cohort, cfg)
    split_of = pa.array(cohort["RID"].to_pandas().map(assignment.set_index("RID")["split"]))
    tables = {name: cohort.filter(pc.equal(split_of, name)) for name in SPLITS}
    return tables, assignment


def first_patients(table: pa.Table, limit: int | None) -> pa.Table:
    """The rows a small run works on: every row, or `limit` of them sorted by patient_id with
    imaged visits first (so the MRI+text student has rows to learn from and to diagnose)."""
    if not limit:
        return table.sort_by("patient_id")
    no_mri = pc.invert(pc.is_valid(table["mri_path"]))
    ordered = table.append_column("_no_mri", no_mri).sort_by(
        [("_no_mri", "ascending"), ("patient_id", "ascending")]
    )
    return ordered.slice(0, limit).drop_columns(["_no_mri"])
