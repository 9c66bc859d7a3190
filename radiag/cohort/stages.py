"""The cohort stages of a run: ingest, synthetic MRI, describe + split.

Each stage reads and writes the run store and returns a small summary, under the
stage contract (`radiag.contract`): skipped when done with the same identity,
refused (or, with `fresh`, superseded) when done with another.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
from pydantic import Field, model_validator

from radiag.cohort.describe import (
    DESCRIPTION_VERSION,
    FIT_VERSION,
    DescribeConfig,
    NormativeModel,
    configured_norm,
    describe,
    fit_norm,
)
from radiag.cohort.mapping import load_mapping
from radiag.cohort.mri import MriConfig, synthesize_mri
from radiag.cohort.readers import (
    CohortReadError,
    read_adnimerge,
    read_aibl,
    read_csv_rows,
    read_mapped_csv,
)
from radiag.cohort.schema import COHORT_SCHEMA
from radiag.cohort.split import SPLITS, SplitConfig, split_cohort
from radiag.cohort.synthetic import SynthConfig, export_csv, export_mapping, generate_cohort
from radiag.cohort.validate import IngestResult, canonicalize
from radiag.config import StrictModel
from radiag.contract import (
    Stage,
    StageIdentity,
    StageSummary,
    config_identity,
    content_digest,
    digest,
    run_stage,
    upstream,
)
from radiag.store import RunStore, filesystem_for

COHORT_TABLE = "cohort/cohort.parquet"
QUARANTINE_TABLE = "cohort/quarantine.parquet"
SYNTHETIC_EXPORT = "raw/ADNIMERGE_synthetic.csv"
MRI_TABLE = "mri/volumes.parquet"
NORM_FILE = "splits/norm.json"


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


COHORT_STAGE = Stage("cohort", "cohort")
MRI_STAGE = Stage("mri", "mri")
SPLITS_STAGE = Stage("splits", "splits")


def _read_source(cfg: IngestConfig, store: RunStore) -> IngestResult:
    if cfg.source == "synthetic":
        # Written as an ADNIMERGE-shaped CSV and read back, so the synthetic cohort goes
        # through exactly the reader a real ADNIMERGE export does.
        export = export_csv(generate_cohort(cfg.synthetic))
        store.write_bytes(SYNTHETIC_EXPORT, export)
        raw = read_csv_rows(store.uri_of(SYNTHETIC_EXPORT), content=io.BytesIO(export))
        return canonicalize(raw, export_mapping(cfg.synthetic))  # a synthetic site: its name
    assert cfg.path is not None
    if cfg.source == "adnimerge":
        return read_adnimerge(cfg.path)
    if cfg.source == "aibl":
        return read_aibl(cfg.path)
    assert cfg.mapping is not None
    return read_mapped_csv(cfg.path, load_mapping(cfg.mapping))


def source_files(cfg: IngestConfig) -> dict[str, str]:
    """Content digest of every file ingestion reads from outside the run (CSV, mapping).

    Raises:
        CohortReadError: a configured file or folder does not exist.
    """
    paths = [p for p in (cfg.path, cfg.mapping) if p]
    found: dict[str, str] = {}
    for path in paths:
        fs, inner = filesystem_for(path)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise CohortReadError(f"{path}: not found")
        files = (
            [inner]
            if info.type == pafs.FileType.File
            else sorted(
                i.path
                for i in fs.get_file_info(pafs.FileSelector(inner))
                if i.type == pafs.FileType.File
            )
        )
        for file in files:
            with fs.open_input_stream(file) as stream:
                found[file] = content_digest(stream)
    return found


def ingest(cfg: IngestConfig, store: RunStore, fresh: bool = False) -> StageSummary:
    """Source -> cohort/cohort.parquet (canonical rows) + cohort/quarantine.parquet."""
    identity = StageIdentity(
        stage="cohort",
        config=config_identity(cfg),
        files=source_files(cfg),
        versions={"schema": digest(COHORT_SCHEMA.to_string())},
    )
    return run_stage(store, COHORT_STAGE, identity, lambda: _ingest(cfg, store), fresh=fresh)


def _ingest(cfg: IngestConfig, store: RunStore) -> StageSummary:
    result = _read_source(cfg, store)
    store.write_table(COHORT_TABLE, result.cohort)
    store.write_table(
        QUARANTINE_TABLE, pa.Table.from_pandas(result.quarantine, preserve_index=False)
    )
    labels = pd.Series(result.cohort["label"].to_pylist(), dtype=object).fillna("unlabeled")
    return StageSummary(
        stage="cohort",
        counts={
            "visits": result.cohort.num_rows,
            "subjects": len(pc.unique(result.cohort["RID"])),
            "quarantined_rows": int(result.quarantine[["file", "row"]].drop_duplicates().shape[0]),
            **{f"label_{k}": int(v) for k, v in labels.value_counts().items()},
        },
        details={"quarantine_reasons": result.reasons()},
    )


def describe_and_split(
    describe_cfg: DescribeConfig, split_cfg: SplitConfig, store: RunStore, fresh: bool = False
) -> StageSummary:
    """cohort -> splits/{train,val,test}.parquet (described), splits/assignment.parquet and
    splits/norm.json (the norm that graded the MRI findings, whichever `describe.norm` names)."""
    reads = [COHORT_STAGE, MRI_STAGE] if store.exists(MRI_STAGE.record) else [COHORT_STAGE]
    identity = StageIdentity(
        stage="splits",
        config={"describe": config_identity(describe_cfg), "split": config_identity(split_cfg)},
        upstream=upstream(store, reads),
        versions={"description": DESCRIPTION_VERSION, "norm": _norm_version(describe_cfg)},
    )
    return run_stage(
        store,
        SPLITS_STAGE,
        identity,
        lambda: _split(describe_cfg, split_cfg, store, identity),
        fresh=fresh,
    )


def _norm_version(cfg: DescribeConfig) -> str:
    """What the grades depend on besides the config and the upstream cohort: the numbers of
    a norm known beforehand (reference.yaml's, a saved file's), or how one fitted here is fit.

    Raises:
        CohortReadError: a saved norm's path is missing or holds no norm.
    """
    if cfg.norm == "fitted":
        return FIT_VERSION
    return digest(configured_norm(cfg).model_dump(mode="json"))


def _stage_norm(cfg: DescribeConfig, train: pa.Table, identity: StageIdentity) -> NormativeModel:
    """The norm this stage grades with; a fitted one records which stage fitted it on what."""
    if cfg.norm != "fitted":
        return configured_norm(cfg)
    fitted_by = {"split": "train", "stage": identity.fingerprint, "upstream": identity.upstream}
    return fit_norm(train).model_copy(update={"fitted_by": fitted_by})


def run_norm(store: RunStore, cfg: DescribeConfig) -> NormativeModel:
    """The norm a run's splits stage graded with, so a new patient (a served request) is
    graded the same way. A run made before the stage saved it used the one `cfg` names."""
    if store.exists(NORM_FILE):
        return NormativeModel.model_validate(store.read_json(NORM_FILE))
    return configured_norm(cfg)


def _split(
    describe_cfg: DescribeConfig, split_cfg: SplitConfig, store: RunStore, identity: StageIdentity
) -> StageSummary:
    cohort = store.read_table(COHORT_TABLE)
    if store.exists(MRI_TABLE):
        cohort = _attach_mri(cohort, store.read_table(MRI_TABLE))
    # Split first: a fitted norm needs the training split, and every split is graded with it.
    # Describing is row by row, so this equals describing the cohort and then splitting.
    tables, assignment = split_cohort(cohort, split_cfg)
    norm = _stage_norm(describe_cfg, tables["train"], identity)
    store.write_json(NORM_FILE, norm.model_dump(mode="json"))
    tables = {name: describe(table, describe_cfg, norm) for name, table in tables.items()}
    for name, table in tables.items():
        store.write_table(f"splits/{name}.parquet", table)
    store.write_table(
        "splits/assignment.parquet", pa.Table.from_pandas(assignment, preserve_index=False)
    )
    counts = {f"{name}_visits": t.num_rows for name, t in tables.items()}
    counts |= {f"{name}_subjects": int((assignment["split"] == name).sum()) for name in SPLITS}
    strata = assignment.groupby(["split", "stratum"]).size()
    return StageSummary(
        stage="splits",
        counts=counts,
        details={
            "subjects_by_split_and_label": {
                f"{split}/{label}": int(n) for (split, label), n in strata.items()
            },
            "norm": {"kind": norm.kind, "subjects": norm.subjects},
        },
    )


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


def synthetic_mri(cfg: MriConfig, store: RunStore, fresh: bool = False) -> StageSummary:
    """Synthetic T1 volumes (+ segmentations) for a subset of baseline visits -> mri/."""
    identity = StageIdentity(
        stage="mri", config=config_identity(cfg), upstream=upstream(store, [COHORT_STAGE])
    )
    return run_stage(store, MRI_STAGE, identity, lambda: _synthesize(cfg, store), fresh=fresh)


def _synthesize(cfg: MriConfig, store: RunStore) -> StageSummary:
    volumes = synthesize_mri(pick_mri_subjects(store.read_table(COHORT_TABLE), cfg), store, cfg)
    store.write_table(MRI_TABLE, pa.Table.from_pandas(volumes, preserve_index=False))
    errors = volumes["error"].dropna()
    return StageSummary(
        stage="mri",
        counts={"volumes": int(volumes["mri_path"].notna().sum()), "failed": len(errors)},
        details={"errors": errors.tolist()},
    )


def _attach_mri(cohort: pa.Table, volumes: pa.Table) -> pa.Table:
    """Fill `mri_path` for the visits that have a synthetic T1."""
    paths = volumes.to_pandas().dropna(subset=["mri_path"]).set_index("patient_id")["mri_path"]
    mri_path = cohort["patient_id"].to_pandas().map(paths)
    index = cohort.schema.get_field_index("mri_path")
    return cohort.set_column(index, "mri_path", pa.array(mri_path, type=pa.string()))
