"""The cohort stages of a run: ingest, synthetic MRI, describe + split.

Each stage reads and writes the run store and returns a small summary. A stage
whose summary is already in the store for the same config is skipped (a re-run
resumes); the same output from a different config is refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, model_validator

from radiag.cohort.describe import DescribeConfig, describe
from radiag.cohort.mapping import bundled_mapping, load_mapping
from radiag.cohort.mri import MriConfig, synthesize_mri
from radiag.cohort.readers import read_adnimerge, read_aibl, read_csv_rows, read_mapped_csv
from radiag.cohort.split import SPLITS, SplitConfig, split_cohort
from radiag.cohort.synthetic import SynthConfig, generate_cohort
from radiag.cohort.validate import IngestResult, canonicalize
from radiag.config import StrictModel
from radiag.store import RunStore

COHORT_TABLE = "cohort/cohort.parquet"
QUARANTINE_TABLE = "cohort/quarantine.parquet"
SYNTHETIC_EXPORT = "raw/ADNIMERGE_synthetic.csv"
MRI_TABLE = "mri/volumes.parquet"


class IngestConfig(StrictModel):
    """Where the cohort comes from."""

    source: Literal["synthetic", "adnimerge", "aibl", "csv"] = Field(
        "synthetic",
        description="synthetic cohort, ADNIMERGE.csv, AIBL export folder, or any CSV + mapping",
    )
    path: str | None = Field(
        None, description="ADNIMERGE.csv, AIBL folder or CSV file (not for synthetic)"
    )
    mapping: str | None = Field(None, description="column-mapping YAML, for source: csv")
    synthetic: SynthConfig = Field(default_factory=SynthConfig)

    @model_validator(mode="after")
    def _inputs_present(self) -> IngestConfig:
        if self.source != "synthetic" and not self.path:
            raise ValueError(f"source {self.source!r} needs a path")
        if self.source == "csv" and not self.mapping:
            raise ValueError("source 'csv' needs a mapping YAML")
        return self


class StageSummary(BaseModel):
    """What a stage did; stored as <stage>/summary.json and printed by the CLI."""

    stage: str
    config_fingerprint: str
    counts: dict[str, int] = Field(default_factory=dict)
    details: dict[str, object] = Field(default_factory=dict)


def fingerprint(*parts: BaseModel | str) -> str:
    """Short hash of configs (and upstream fingerprints): what a stage's output depends on."""
    dumped = [p if isinstance(p, str) else p.model_dump(mode="json") for p in parts]
    payload = json.dumps(dumped, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def finished(store: RunStore, stage: str, print_: str) -> StageSummary | None:
    """The stored summary if this stage already ran with this config; raises if with another."""
    path = f"{stage}/summary.json"
    if not store.exists(path):
        return None
    summary = StageSummary.model_validate(store.read_json(path))
    if summary.config_fingerprint != print_:
        raise RuntimeError(
            f"{store.uri_of(stage)} was written by a different {stage} config; "
            "use a new run_dir (or delete that folder) to run with this one"
        )
    return summary


def _fingerprint_of(store: RunStore, stage: str) -> str:
    return StageSummary.model_validate(store.read_json(f"{stage}/summary.json")).config_fingerprint


def _read_source(cfg: IngestConfig, store: RunStore) -> IngestResult:
    if cfg.source == "synthetic":
        # Written as an ADNIMERGE-shaped CSV and read back, so the synthetic cohort goes
        # through exactly the reader a real ADNIMERGE export does.
        export = generate_cohort(cfg.synthetic).to_csv(index=False).encode()
        store.write_bytes(SYNTHETIC_EXPORT, export)
        raw = read_csv_rows(store.uri_of(SYNTHETIC_EXPORT), content=io.BytesIO(export))
        return canonicalize(raw, bundled_mapping("adnimerge"))
    assert cfg.path is not None
    if cfg.source == "adnimerge":
        return read_adnimerge(cfg.path)
    if cfg.source == "aibl":
        return read_aibl(cfg.path)
    assert cfg.mapping is not None
    return read_mapped_csv(cfg.path, load_mapping(cfg.mapping))


def ingest(cfg: IngestConfig, store: RunStore) -> StageSummary:
    """Source -> cohort/cohort.parquet (canonical rows) + cohort/quarantine.parquet."""
    key = fingerprint(cfg)
    if done := finished(store, "cohort", key):
        return done
    result = _read_source(cfg, store)
    store.write_table(COHORT_TABLE, result.cohort)
    store.write_table(
        QUARANTINE_TABLE, pa.Table.from_pandas(result.quarantine, preserve_index=False)
    )
    labels = pd.Series(result.cohort["label"].to_pylist(), dtype=object).fillna("unlabeled")
    summary = StageSummary(
        stage="cohort",
        config_fingerprint=key,
        counts={
            "visits": result.cohort.num_rows,
            "subjects": len(pc.unique(result.cohort["RID"])),
            "quarantined_rows": int(result.quarantine[["file", "row"]].drop_duplicates().shape[0]),
            **{f"label_{k}": int(v) for k, v in labels.value_counts().items()},
        },
        details={"quarantine_reasons": result.quarantine["reason"].value_counts().to_dict()},
    )
    store.write_json("cohort/summary.json", summary.model_dump())
    return summary


def describe_and_split(
    describe_cfg: DescribeConfig, split_cfg: SplitConfig, store: RunStore
) -> StageSummary:
    """cohort -> descriptions -> splits/{train,val,test}.parquet + splits/assignment.parquet."""
    upstream = [
        _fingerprint_of(store, stage)
        for stage in ("cohort", "mri")
        if store.exists(f"{stage}/summary.json")
    ]
    key = fingerprint(describe_cfg, split_cfg, *upstream)
    if done := finished(store, "splits", key):
        return done
    cohort = store.read_table(COHORT_TABLE)
    if store.exists(MRI_TABLE):
        cohort = _attach_mri(cohort, store.read_table(MRI_TABLE))
    tables, assignment = split_cohort(describe(cohort, describe_cfg), split_cfg)
    for name, table in tables.items():
        store.write_table(f"splits/{name}.parquet", table)
    store.write_table(
        "splits/assignment.parquet", pa.Table.from_pandas(assignment, preserve_index=False)
    )
    counts = {f"{name}_visits": t.num_rows for name, t in tables.items()}
    counts |= {f"{name}_subjects": int((assignment["split"] == name).sum()) for name in SPLITS}
    strata = assignment.groupby(["split", "stratum"]).size()
    summary = StageSummary(
        stage="splits",
        config_fingerprint=key,
        counts=counts,
        details={
            "subjects_by_split_and_label": {
                f"{split}/{label}": int(n) for (split, label), n in strata.items()
            }
        },
    )
    store.write_json("splits/summary.json", summary.model_dump())
    return summary


def pick_mri_subjects(cohort: pa.Table, cfg: MriConfig) -> pd.DataFrame:
    """Baseline visits with the volumes a T1 needs, `cfg.subjects` of them, balanced over labels."""
    visits = cohort.select(
        ["patient_id", "RID", "VISCODE", "label", "Hippocampus", "Ventricles", "ICV"]
    )
    frame = visits.to_pandas()
    frame = frame[(frame["VISCODE"] == "bl")].dropna(subset=["Hippocampus", "Ventricles", "ICV"])
    rng = np.random.default_rng(cfg.seed)
    frame = frame.iloc[rng.permutation(len(frame))]
    # Round-robin over labels: rank within label, then take the lowest ranks first.
    frame["rank"] = frame.groupby(frame["label"].fillna("unlabeled")).cumcount()
    picked = frame.sort_values(["rank", "patient_id"], kind="stable").head(cfg.subjects)
    return picked[["patient_id", "Hippocampus", "Ventricles", "ICV"]].reset_index(drop=True)


def synthetic_mri(cfg: MriConfig, store: RunStore) -> StageSummary:
    """Synthetic T1 volumes (+ segmentations) for a subset of baseline visits -> mri/."""
    key = fingerprint(cfg, _fingerprint_of(store, "cohort"))
    if done := finished(store, "mri", key):
        return done
    volumes = synthesize_mri(pick_mri_subjects(store.read_table(COHORT_TABLE), cfg), store, cfg)
    store.write_table(MRI_TABLE, pa.Table.from_pandas(volumes, preserve_index=False))
    errors = volumes["error"].dropna()
    summary = StageSummary(
        stage="mri",
        config_fingerprint=key,
        counts={"volumes": int(volumes["mri_path"].notna().sum()), "failed": len(errors)},
        details={"errors": errors.tolist()},
    )
    store.write_json("mri/summary.json", summary.model_dump())
    return summary


def _attach_mri(cohort: pa.Table, volumes: pa.Table) -> pa.Table:
    """Fill `mri_path` for the visits that have a synthetic T1."""
    paths = volumes.to_pandas().dropna(subset=["mri_path"]).set_index("patient_id")["mri_path"]
    mri_path = cohort["patient_id"].to_pandas().map(paths)
    index = cohort.schema.get_field_index("mri_path")
    return cohort.set_column(index, "mri_path", pa.array(mri_path, type=pa.string()))
