"""The model deployments behind /v1/diagnose: students, baselines and the few-shot teacher.

Each one loads what a run produced through the same code the batch stages use
(`StudentDiagnoser`, the fitted baseline pipelines, the exemplar pool and prompt
templates), so a served answer and a batch answer for the same patient agree. A
request that cannot be answered (say, a T1 the transform refuses) comes back as
`{"error": ...}` for that request alone; the rest of its batch is answered.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from ray import serve

from radiag.baseline import BASELINE_STAGE, MODELS_DIR, load_baseline, predict_rows
from radiag.cohort.mri import decode_nifti_gz
from radiag.cohort.schema import Label
from radiag.contract import read_record
from radiag.outputs import PROBABILITY_COLUMNS
from radiag.serving.config import BatchingConfig
from radiag.store import RunStore
from radiag.students.config import (
    StudentDiagnoseConfig,
    StudentKind,
    distill_stage,
    student_diagnose_stage,
)
from radiag.students.predict import (
    StudentDiagnoser,
    download_student,
    fits_a_decision,
    read_fitted_offsets,
)
from radiag.students.volumes import volume_transform

log = logging.getLogger(__name__)


def probabilities_of(answer: dict[str, Any]) -> dict[str, float] | None:
    """{"AD": p, "MCI": p, "CN": p} from an output row's probability columns."""
    values = {label.value: answer.get(PROBABILITY_COLUMNS[label]) for label in Label}
    return None if any(v is None for v in values.values()) else values


def stage_fingerprint(store: RunStore, stage: Any) -> str:
    """The identity of the stage that made a model: what a served answer names."""
    record = read_record(store, stage)
    if record is None or record.status != "complete":
        raise FileNotFoundError(f"{store.uri_of(stage.record)}: stage {stage.name} not complete")
    return record.fingerprint


def student_diagnose_config(store: RunStore, kind: StudentKind) -> StudentDiagnoseConfig:
    """How the run's student diagnosis stage decoded (defaults if the run has none)."""
    record = read_record(store, student_diagnose_stage(kind))
    return StudentDiagnoseConfig.model_validate(record.identity.config if record else {})


@dataclass(frozen=True)
class StudentRequest:
    description: str
    nifti: bytes | None = None


@serve.deployment
class StudentServer:
    """One student (text or MRI+text). `user_config` = {"run_dir", "max_batch_size",
    "batch_wait_timeout_s"}: changing `run_dir` swaps in that run's student; requests in
    flight finish on the model they started with."""

    def __init__(self, kind: StudentKind, threads: int, diagnose: dict[str, Any]) -> None:
        self.kind = kind
        self.cfg = StudentDiagnoseConfig.model_validate(diagnose)
        torch.set_num_threads(threads)
        self.student: StudentDiagnoser | None = None
        self.identity = ""
        self.run_dir: str | None = None

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        batching = BatchingConfig.model_validate(
            {k: v for k, v in user_config.items() if k != "run_dir"}
        )
        self.diagnose_batch.set_max_batch_size(batching.max_batch_size)
        self.diagnose_batch.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        if user_config["run_dir"] != self.run_dir:
            store = RunStore(user_config["run_dir"])
            identity = stage_fingerprint(store, distill_stage(self.kind))
            offsets = read_fitted_offsets(store, self.kind) if fits_a_decision(self.cfg) else None
            student = StudentDiagnoser(download_student(store, self.kind), self.cfg, offsets)
            # One assignment: a batch already running keeps its reference to the old model.
            self.student, self.identity, self.run_dir = student, identity, user_config["run_dir"]
            log.info("serving the %s student of %s (%s)", self.kind, store.uri, identity)

    def check_ready(self) -> str:
        return self.identity

    async def __call__(self, request: StudentRequest) -> dict[str, Any]:
        volume = None
        if self.kind == "vlm":
            if request.nifti is None:
                return {"error": "the MRI+text student needs a T1 (upload one or give mri_uri)"}
            try:
                volume = await asyncio.to_thread(self._volume, request.nifti)
            except Exception as err:  # nibabel and MONAI share no base class
                return {"error": f"cannot use the T1: {type(err).__name__}: {err}"}
        return await self.diagnose_batch(request.description, volume)

    def _volume(self, nifti: bytes) -> torch.Tensor:
        assert self.student is not None
        transform = volume_transform(self.student.trained.mri.volumes)
        return torch.from_numpy(transform(decode_nifti_gz(nifti)))  # (1, D, H, W)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def diagnose_batch(
        self, descriptions: list[str], volumes: list[torch.Tensor | None]
    ) -> list[dict[str, Any]]:
        student, identity = self.student, self.identity
        assert student is not None
        stacked = torch.stack(volumes) if self.kind == "vlm" else None  # (B, 1, D, H, W)
        # On this replica's event loop, not a worker thread: generation is Python-heavy and,
        # from a thread, starves the loop of the GIL, so the next batch fills with only a
        # request or two (measured: batches of 2 instead of 8). Requests that arrive while a
        # batch runs wait in Serve's queue and make up the next one.
        answers = student.diagnose(descriptions, stacked)
        return [
            {
                "identity": identity,
                "rationale": a["rationale"],
                "diagnosis": a["diagnosis"],
                "probabilities": probabilities_of(a),
                "parse_error": a.get("parse_error"),
                "decision": student.decision,
                "mri_used": stacked is not None,
                "batch_size": len(descriptions),
            }
            for a in answers
        ]


@serve.deployment
class BaselineServer:
    """Every fitted baseline of the run (scikit-learn pipelines), batched per model."""

    def __init__(self, run_dir: str, batching: dict[str, Any]) -> None:
        store = RunStore(run_dir)
        self.identity = stage_fingerprint(store, BASELINE_STAGE)
        self.models = {
            path.rsplit("/", 1)[1].removesuffix(".joblib"): None
            for path in store.list_files(MODELS_DIR, ".joblib")
        }
        self.models = {name: load_baseline(store, name) for name in self.models}
        cfg = BatchingConfig.model_validate(batching)
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def check_ready(self) -> str:
        return self.identity

    async def __call__(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        return await self.predict_batch(name, record)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def predict_batch(
        self, names: list[str], records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        frame = pd.DataFrame(records)
        frame["patient_id"] = [f"row-{i}" for i in range(len(records))]
        answers: list[dict[str, Any]] = [{} for _ in records]
        for name in set(names):
            rows = [i for i, n in enumerate(names) if n == name]
            pipeline, feature_set = self.models[name]
            subset = frame.iloc[rows].reset_index(drop=True)
            for i, out in zip(rows, predict_rows(name, pipeline, feature_set, subset), strict=True):
                answers[i] = {
                    "identity": self.identity,
                    "diagnosis": out["diagnosis"],
                    "probabilities": probabilities_of(out),
                    "batch_size": len(records),
                }
        return answers
