"""Benchmark: student training scaling on Ray Train, and student vs teacher inference.

All in one run, on one machine, so the ratios compare like with like:
  scaling    the text student (SmolLM2-135M + LoRA) and the MRI+text student trained
             with 1 Ray Train worker, then 2, each worker held to ONE torch thread, so
             the ratio measures data-parallel scaling, not thread contention;
  strategy   2 workers with DeepSpeed ZeRO-2 vs plain DDP (the same loop);
  inference  patients/s of the teacher's few-shot diagnosis (vLLM) vs the distilled
             text student (transformers) on the same test patients, end to end.
Throughput is the median of the steps after `--warmup` (the first steps include
start-up). Training rationales are fixed-length template text: content does not
change the cost of a step. Writes benchmarks/results/students.json.

    python benchmarks/students.py --steps 10
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

RESULTS = Path(__file__).parent / "results" / "students.json"
RATIONALE = (
    "The patient is {age:.0f} years old with an MMSE of {mmse:.0f}. The APOE4 count is "
    "{apoe:.0f}. Hippocampal volume and the other regional volumes are graded against "
    "age- and head-size-adjusted norms; together with the cognitive score they point to "
    "the diagnosis given below, because memory loss and medial temporal atrophy go together."
)


def prepare_run(run_dir: str, subjects: int, imaged: int) -> None:
    """Cohort, synthetic T1s, splits and template rationales for every labelled train row."""
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.mri import MriConfig
    from radiag.cohort.split import SplitConfig
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest, synthetic_mri
    from radiag.cohort.synthetic import SynthConfig
    from radiag.contract import StageIdentity, StageSummary, run_stage
    from radiag.outputs import write_part
    from radiag.store import RunStore
    from radiag.teacher.stages import RATIONALIZE_STAGE

    store = RunStore(run_dir)
    ingest(IngestConfig(synthetic=SynthConfig(subjects=subjects, max_visits=1)), store)
    synthetic_mri(MriConfig(subjects=imaged), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    rows = [
        {
            "patient_id": r["patient_id"], "task": "rationalize", "label_shown": r["label"],
            "diagnosis": r["label"], "qc_flagged": False,
            "rationale": RATIONALE.format(age=r["AGE"], mmse=r["MMSE"] or 0, apoe=r["APOE4"] or 0),
        }
        for r in store.read_table("splits/train.parquet").to_pylist()
        if r["label"]
    ]  # fmt: skip

    def write() -> StageSummary:
        write_part(store, "rationales", rows)
        return StageSummary(stage="rationalize", counts={"rows": len(rows)})

    # Recorded as a finished rationalize stage of its own identity: distill reads its digest.
    identity = StageIdentity(stage="rationalize", config={"benchmark": "template rationales"})
    run_stage(store, RATIONALIZE_STAGE, identity, write)


def train(run_dir: str, kind: str, workers: int, strategy: str, steps: int, warmup: int) -> dict:
    """One training run in a fresh copy of the checkpoints folder; steady-state throughput."""
    import shutil

    from radiag.store import RunStore
    from radiag.students.config import DistillConfig
    from radiag.students.distill import run_distill, stage_dir

    store = RunStore(run_dir)
    shutil.rmtree(store.path(stage_dir(kind)), ignore_errors=True)  # each measurement trains anew
    cfg = DistillConfig.model_validate(
        {
            "loss": "rationale_label", "max_length": 512,
            "optim": {"max_steps": steps, "batch_size": 2 if kind == "text" else 1},
            "checkpoint_every": steps,
            "mri": {"volumes": {"pixdim_mm": 4.0, "spatial_size": [48, 64, 48]}},
            "scaling": {"workers": workers, "threads_per_worker": 1, "cpus_per_worker": 0.9,
                        "strategy": strategy, "zero_stage": 2},
        }
    )  # fmt: skip
    start = time.perf_counter()
    run_distill(kind, cfg, store)
    lines = Path(store.path(f"{stage_dir(kind)}/metrics.jsonl")).read_text().splitlines()
    steady = [json.loads(line) for line in lines][warmup:]
    return {
        "workers": workers,
        "strategy": strategy,
        "threads_per_worker": 1,
        "steps_measured": len(steady),
        "samples_per_s": round(statistics.median(m["samples_per_s"] for m in steady), 3),
        "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in steady), 1),
        "step_seconds": round(statistics.median(m["step_seconds"] for m in steady), 3),
        "end_to_end_seconds": round(time.perf_counter() - start, 1),
    }


def inference(run_dir: str, patients: int) -> dict[str, Any]:
    """Teacher few-shot diagnosis vs the distilled text student, same test patients, end to end.

    Same engine on both sides: the student's zero-shot prompt is the teacher's diagnosis
    prompt with no exemplars, so the teacher stage with k=0 and the student's exported HF
    model is the student served by vLLM. Our transformers predictor is reported beside it.
    """
    import shutil

    from radiag.store import RunStore
    from radiag.students.config import StudentDiagnoseConfig
    from radiag.students.distill import stage_dir
    from radiag.students.predict import run_student_diagnose
    from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
    from radiag.teacher.exemplars import ExemplarConfig
    from radiag.teacher.stages import DiagnoseConfig, run_teacher

    def vllm_diagnosis(store: RunStore, model: dict, exemplars: int) -> tuple[float, int]:
        cfg = DiagnoseConfig(
            engine=VllmEngineConfig(model=model, batch_size=16, max_model_len=2048),
            sampling=SamplingConfig(max_tokens=96, repetition_penalty=1.2),
            exemplars=ExemplarConfig(k=exemplars), limit=patients,
        )  # fmt: skip
        start = time.perf_counter()
        summary = run_teacher("diagnose", cfg, store)
        return time.perf_counter() - start, summary.output_tokens_now

    store = RunStore(run_dir)
    student_run = RunStore(tempfile.mkdtemp(prefix="radiag-bench-student-vllm-"))
    for name in ("splits", "rationales"):
        shutil.copytree(store.path(name), student_run.path(name))
    teacher_s, teacher_tokens = vllm_diagnosis(store, {"bundled": "smollm2-135m-instruct"}, 3)
    student_lm = {"path": store.path(f"{stage_dir('text')}/final/lm")}
    student_s, student_tokens = vllm_diagnosis(student_run, student_lm, 0)
    start = time.perf_counter()
    run_student_diagnose(
        "text", StudentDiagnoseConfig(limit=patients, batch_size=16, max_new_tokens=96), store
    )
    predictor_s = time.perf_counter() - start

    def side(engine: str, seconds: float, tokens: int | None = None) -> dict[str, Any]:
        return {"engine": engine, "seconds": round(seconds, 1),
                "patients_per_s": round(patients / seconds, 3), "output_tokens": tokens}  # fmt: skip

    return {
        "patients": patients,
        "teacher": side("vllm, few-shot k=3 (SmolLM2-135M)", teacher_s, teacher_tokens),
        "student_vllm": side("vllm, zero-shot (exported student)", student_s, student_tokens),
        "student_predictor": side("transformers (radiag diagnose --model text)", predictor_s),
        "ratio_student_vs_teacher": round(teacher_s / student_s, 3),
        "ratio_student_predictor_vs_teacher": round(teacher_s / predictor_s, 3),
        "note": "end to end, engine start-up included on every side; the same 135M base "
                "model on both sides here, so the gain is the prompt (no exemplars); with a "
                "70B teacher the ratio also carries the model size",
    }  # fmt: skip


def main(
    steps: Annotated[int, typer.Option(help="optimizer steps per training run")] = 10,
    warmup: Annotated[int, typer.Option(help="first steps left out of the medians")] = 3,
    patients: Annotated[int, typer.Option(help="test patients for the inference comparison")] = 32,
    inference_only: Annotated[
        bool, typer.Option(help="re-measure only the inference comparison")
    ] = False,
) -> None:
    from radiag.pipeline import RayConfig, connect_ray

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_dir = tempfile.mkdtemp(prefix="radiag-bench-students-")
    connect_ray(RayConfig(num_cpus=2))
    prepare_run(run_dir, subjects=300, imaged=48)
    if inference_only:
        train(run_dir, "text", 1, "ddp", steps, warmup)
        results = json.loads(RESULTS.read_text())
        results["inference"] = inference(run_dir, patients)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["inference"], indent=2))
        return

    text = {n: train(run_dir, "text", n, "ddp", steps, warmup) for n in (1, 2)}
    deepspeed = train(run_dir, "text", 2, "deepspeed", steps, warmup)
    vlm = {n: train(run_dir, "vlm", n, "ddp", steps, warmup) for n in (1, 2)}
    train(run_dir, "text", 2, "ddp", steps, warmup)  # the student the inference test uses
    results = {
        "scaling_2_vs_1_workers": round(text[2]["samples_per_s"] / text[1]["samples_per_s"], 3),
        "goal_scaling": 1.6,
        "text_student": {"model": "SmolLM2-135M-Instruct + LoRA r16", "runs": list(text.values())},
        "vlm_student": {
            "model": "DenseNet (small, 3D, 4 mm) -> 8 prefix tokens -> SmolLM2-135M + LoRA",
            "runs": list(vlm.values()),
            "scaling_2_vs_1_workers": round(vlm[2]["samples_per_s"] / vlm[1]["samples_per_s"], 3),
        },
        "deepspeed_vs_ddp_2_workers": {
            "deepspeed_zero2": deepspeed, "ddp": text[2],
            "ratio": round(deepspeed["samples_per_s"] / text[2]["samples_per_s"], 3),
        },
        "inference": inference(run_dir, patients),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    typer.run(main)
