"""`radiag distill`: train one student on the teacher's rationales with Ray Train.

Phases, in order:
1. `training_examples`: rationales joined with the training split. Rationales for
   patients that are not in this run's training split are refused (another cohort
   or run); rows the teacher's QC flagged are left out unless `include_flagged`;
   the MRI+text student also needs a readable volume (failures are counted, named
   and skipped).
2. `training_sequences`: each example becomes the sequence(s) of the chosen loss.
3. `TorchTrainer.fit`: `training.train_loop` on every worker; checkpoints in
   `checkpoints/<student>/train/`. A killed run re-run with the same config
   continues from its last checkpoint.
4. `export_final`: an HF-format LM (LoRA merged; the adapter kept beside it) that
   transformers and vLLM load, plus the MRI encoder/projector for `vlm`, in
   `checkpoints/<student>/final/`.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel

from radiag.cohort.schema import Label
from radiag.cohort.stages import SPLITS_STAGE
from radiag.contract import StageIdentity, StageSummary, config_identity, run_stage, upstream
from radiag.errors import UserError
from radiag.models import model_fingerprint, prepare_model
from radiag.outputs import read_parts
from radiag.precision import ResolvedDtype, torch_dtype
from radiag.store import RunStore
from radiag.students.config import (
    FINAL_MARKER,
    DistillConfig,
    StudentKind,
    distill_stage,
    stage_dir,
)
from radiag.students.formatting import encode_target, targets
from radiag.students.modeling import StudentModel, load_trainable, require_exact_keys
from radiag.students.training import (
    STATE_FILE,
    TRAINABLE_FILE,
    Progress,
    build_mri_prefix,
    build_student,
    pad_id,
    train_loop,
)
from radiag.students.volumes import prepare_volumes
from radiag.teacher.stages import RATIONALIZE_STAGE

log = logging.getLogger(__name__)


class StudentDataError(UserError, RuntimeError):
    """Training data that cannot belong to this run; the message is user-facing."""


class Examples(BaseModel):
    """The training rows of a student and what was left out, and why."""

    model_config = {"arbitrary_types_allowed": True}

    table: pa.Table  # patient_id, description, rationale, label, volume_path
    counts: dict[str, int]
    errors: list[str]


def training_examples(kind: StudentKind, cfg: DistillConfig, store: RunStore) -> Examples:
    """Rationales of this run's training split, checked and filtered (phase 1)."""
    rationales = read_parts(store, "rationales")
    if rationales.num_rows == 0:
        raise StudentDataError(
            f"{store.uri_of('rationales')} is empty: run `radiag rationalize` before distilling"
        )
    train = store.read_table("splits/train.parquet").select(
        ["patient_id", "description", "label", "mri_path"]
    )
    _check_same_run(rationales, train, store)
    usable = pc.and_(
        pc.and_(pc.is_null(rationales["error"]), pc.is_valid(rationales["rationale"])),
        pc.is_valid(rationales["diagnosis"]),
    )
    flagged = pc.fill_null(rationales["qc_flagged"], False)
    keep = usable if cfg.include_flagged else pc.and_(usable, pc.invert(flagged))
    kept = rationales.filter(keep).select(["patient_id", "rationale"])
    table = kept.join(train, "patient_id", join_type="inner").sort_by("patient_id")
    if cfg.limit:
        table = table.slice(0, cfg.limit)
    counts = {
        "rationales": rationales.num_rows,
        "unusable": rationales.num_rows - (pc.sum(usable).as_py() or 0),
        "excluded_flagged": 0
        if cfg.include_flagged
        else pc.sum(pc.and_(usable, flagged)).as_py() or 0,
    }
    errors: list[str] = []
    if kind == "vlm":
        table, counts, errors = _with_volumes(table, cfg, store, counts)
    else:
        table = table.append_column("volume_path", pa.nulls(table.num_rows, pa.string()))
    counts["examples"] = table.num_rows
    if table.num_rows == 0:
        raise StudentDataError(f"no usable training rows for the {kind} student: {counts}")
    return Examples(table=table, counts=counts, errors=errors)


def _check_same_run(rationales: pa.Table, train: pa.Table, store: RunStore) -> None:
    """Refuse rationales written for other patients or other labels than this run's."""
    ids = pc.is_in(rationales["patient_id"], train["patient_id"])
    foreign = rationales.filter(pc.invert(ids))["patient_id"].to_pylist()
    if foreign:
        raise StudentDataError(
            f"{len(foreign)} of {rationales.num_rows} rows in {store.uri_of('rationales')} are not "
            f"in {store.uri_of('splits/train.parquet')} (e.g. {', '.join(foreign[:3])}): the "
            "rationale table comes from another cohort or run; refusing to train on it"
        )
    joined = rationales.select(["patient_id", "label_shown"]).join(
        train.select(["patient_id", "label"]), "patient_id", join_type="inner"
    )
    differs = joined.filter(pc.not_equal(joined["label_shown"], joined["label"]))
    if differs.num_rows:
        raise StudentDataError(
            f"{differs.num_rows} rationales in {store.uri_of('rationales')} explain another label "
            f"than this run's training split (e.g. {differs['patient_id'][0]}); refusing to train"
        )


def _with_volumes(
    table: pa.Table, cfg: DistillConfig, store: RunStore, counts: dict[str, int]
) -> tuple[pa.Table, dict[str, int], list[str]]:
    """Keep the rows whose MRI preprocesses; count and name the others."""
    imaged = table.filter(pc.is_valid(table["mri_path"]))
    counts = {**counts, "no_mri": table.num_rows - imaged.num_rows}
    prepared = prepare_volumes(imaged.select(["patient_id", "mri_path"]), cfg.mri.volumes, store)
    errors = [e for e in prepared.table["error"].to_pylist() if e]
    for error in errors:
        log.warning("skipped: %s", error)
    ready = prepared.table.filter(pc.is_null(prepared.table["error"]))
    joined = imaged.join(
        ready.select(["patient_id", "volume_path"]), "patient_id", join_type="inner"
    )
    return joined.sort_by("patient_id"), {**counts, "mri_failed": prepared.failed}, errors


def training_sequences(
    examples: pa.Table, cfg: DistillConfig, tokenizer: Any
) -> tuple[list[dict[str, Any]], int]:
    """Token ids of every target (phase 2), each with its row's loss weight, shuffled with
    the seed; and how many did not fit."""
    weights = class_weights(label_counts(examples), cfg.balance_classes)
    sequences, too_long = [], 0
    for row in with_swapped_rationales(examples.to_pylist(), cfg.rationale_swap, cfg.seed):
        for target in targets(row, cfg.loss):
            encoded = encode_target(tokenizer, target, cfg.max_length)
            if encoded is None:
                too_long += 1
                continue
            sequences.append({
                **encoded, "weight": weights[str(row["label"])],
                "patient_id": row["patient_id"], "volume_path": row["volume_path"],
            })  # fmt: skip
    order = np.random.default_rng(cfg.seed).permutation(len(sequences))
    return [sequences[i] for i in order], too_long


def with_swapped_rationales(rows: list[dict], share: float, seed: int) -> list[dict]:
    """The rows, a seeded `share` of them (`swapped: True`) holding another of those rows'
    rationale: they pass theirs on in a ring, so none keeps its own."""
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(rows))[: round(share * len(rows))]
    if len(chosen) < 2:
        return rows
    out = list(rows)
    for i, j in zip(chosen, np.roll(chosen, 1), strict=True):
        out[i] = {**rows[i], "rationale": rows[j]["rationale"], "swapped": True}
    return out


def label_counts(examples: pa.Table) -> dict[str, int]:
    """Training rows per diagnosis, every label named (0 where none): the class mix the
    student learned, which its `balanced` decision divides out."""
    labels = examples["label"].to_pylist()
    return {str(label): labels.count(str(label)) for label in Label}


def class_weights(counts: dict[str, int], balance: bool) -> dict[str, float]:
    """Loss weight of a training row by its diagnosis: 1 for all, or balanced, so that each
    diagnosis present carries a third of the total weight (a class absent gets none)."""
    present = {label: n for label, n in counts.items() if n}
    total = sum(present.values())
    return {
        label: (total / (len(present) * present[label]) if balance and label in present else 1.0)
        for label in counts
    }


def _trainer(kind: StudentKind, cfg: DistillConfig, store: RunStore, sequences: list[dict]) -> Any:
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    scaling = cfg.scaling
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "distill": cfg.model_dump(mode="json"), "kind": kind, "store_uri": store.uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        datasets={"train": ray.data.from_items(sequences)},
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=store.path(stage_dir(kind)),
            storage_filesystem=store.fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )  # fmt: skip


def run_distill(
    kind: StudentKind, cfg: DistillConfig, store: RunStore, fresh: bool = False
) -> StageSummary:
    """Train the `kind` student and export it, under the stage contract: a killed run
    resumes from its last checkpoint; rationales that changed are another identity."""
    cfg = cfg.resolved()
    identity = StageIdentity(
        stage=f"distill-{kind}",
        config=config_identity(cfg),
        upstream=upstream(store, [SPLITS_STAGE, RATIONALIZE_STAGE]),
        files={"model": model_fingerprint(cfg.model)},
    )
    return run_stage(
        store, distill_stage(kind), identity, lambda: _distill(kind, cfg, store, identity), fresh
    )


def _distill(
    kind: StudentKind, cfg: DistillConfig, store: RunStore, identity: StageIdentity
) -> StageSummary:
    from transformers import AutoTokenizer

    start = time.perf_counter()
    examples = training_examples(kind, cfg, store)
    model_dir = prepare_model(cfg.model)
    sequences, too_long = training_sequences(
        examples.table, cfg, AutoTokenizer.from_pretrained(model_dir)
    )
    result = _trainer(kind, cfg, store, sequences).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{kind} student training reported no checkpoint")
    with result.checkpoint.as_directory() as checkpoint, tempfile.TemporaryDirectory() as out:
        progress = Progress(**json.loads((Path(checkpoint) / STATE_FILE).read_text()))
        provenance = {
            "kind": kind, "config": cfg.model_dump(mode="json"), "identity": identity.fingerprint,
            "base_model": str(model_dir), "examples": examples.counts, "steps": progress.step,
            "trained_patients": examples.table["patient_id"].to_pylist(),
            "label_counts": label_counts(examples.table),
        }  # fmt: skip
        export_final(kind, cfg, Path(checkpoint), Path(out), provenance)
        store.upload_dir(Path(out), f"{stage_dir(kind)}/final")
    store.write_bytes(
        f"{stage_dir(kind)}/metrics.jsonl",
        "".join(json.dumps(m) + "\n" for m in progress.history).encode(),
    )
    seen = progress.step * cfg.optim.batch_size * cfg.scaling.workers  # sequences trained on
    return StageSummary(
        stage=f"distill-{kind}",
        counts={**examples.counts, "sequences": len(sequences), "too_long": too_long,
                "steps": progress.step},
        details={"final_model": store.uri_of(f"{stage_dir(kind)}/final"),
                 "resumed_at_steps": progress.resumed_at, "mri_errors": examples.errors,
                 "seconds": round(time.perf_counter() - start, 1),
                 "epochs": round(seen / len(sequences), 3) if len(sequences) else 0.0},
    )  # fmt: skip


def export_final(
    kind: StudentKind, cfg: DistillConfig, checkpoint: Path, out: Path, provenance: dict[str, Any]
) -> None:
    """Phase 4: `lm/` (HF, in the training precision; LoRA merged), `adapter/` (LoRA),
    `mri_prefix.pt` (vlm)."""
    from transformers import AutoTokenizer

    model_dir = prepare_model(cfg.model)
    model = build_student(kind, cfg, model_dir)
    load_trainable(model, torch.load(checkpoint / TRAINABLE_FILE))
    lm = model.lm
    if cfg.finetune == "lora":
        lm.save_pretrained(out / "adapter")
        lm = lm.merge_and_unload()
    lm.to(torch_dtype(cfg.export_dtype)).save_pretrained(out / "lm")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out / "lm")
    if model.mri is not None:
        buffer = io.BytesIO()
        torch.save(model.mri.state_dict(), buffer)
        (out / "mri_prefix.pt").write_bytes(buffer.getvalue())
    (out / FINAL_MARKER).write_text(json.dumps(provenance, indent=2))


def load_final(directory: Path, dtype: ResolvedDtype) -> tuple[StudentModel, dict]:
    """A trained student from its exported directory, in `dtype`, and its provenance.

    Raises:
        StudentWeightsError: `lm/` lacks a weight or has a foreign one (the MRI prefix
            loads with `strict=True`, which raises naming the keys too).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    marker = directory / FINAL_MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{directory} is not a finished student export (no {FINAL_MARKER})")
    info = json.loads(marker.read_text())
    cfg = DistillConfig.model_validate(info["config"])
    lm, loading = AutoModelForCausalLM.from_pretrained(
        directory / "lm", dtype=torch_dtype(dtype), output_loading_info=True
    )
    require_exact_keys(loading["missing_keys"], loading["unexpected_keys"], f"{directory}/lm")
    tokenizer = AutoTokenizer.from_pretrained(directory / "lm")
    mri = None
    if info["kind"] == "vlm":
        mri = build_mri_prefix(cfg.mri, lm)
        mri.load_state_dict(torch.load(directory / "mri_prefix.pt"))
    return StudentModel(lm, mri, pad_id(tokenizer)).eval(), info
