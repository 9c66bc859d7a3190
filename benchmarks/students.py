"""Benchmark: student training on Ray Train (scaling, equal cores, strategy) and inference.

All in one run, on one machine, so the ratios compare like with like:
  scaling      the text student (SmolLM2-135M + LoRA) and the MRI+text student trained
               with 1 Ray Train worker, then 2, each worker held to ONE torch thread
               (`scaling_one_thread_per_worker`): data-parallel scaling with the cores
               used going from 1 to 2, not a comparison at equal cores;
  equal cores  the text student on both cores two ways: 2 workers x 1 thread vs 1 worker
               x 2 threads, with the same samples per optimizer step (4 per worker vs 8),
               so only where the parallelism is differs (`distributed_efficiency_equal_cores`
               = samples/s of 2x1 / samples/s of 1x2: what Ray Train's data parallelism
               costs or gains over torch's own threads on the same cores);
  strategy     2 workers with DeepSpeed ZeRO-2 vs plain DDP (the same loop);
  inference    the teacher's few-shot diagnosis (vLLM) vs the distilled text student (the
               exported student served by vLLM zero-shot, and our transformers predictor)
               on the same test patients: end to end, and apart from it start-up vs steady
               throughput, in patients/s and output tokens/s on every side.
  roofline     each text run's tokens/s times the matmul FLOPs a token of these sequences
               costs (the layers' projections and LoRA, forward plus gradients; the
               vocabulary projection at labelled positions; causal attention: see
               `matmul_flops_per_token`), over the matmul peak measured here with the same
               threads and dtype (`text_training_roofline_fraction`: the best run; goal
               >= 0.4). The fraction by the projections alone, the count used up to
               c375432, is reported beside it.
Training throughput is the median of the steps after `--warmup` (the first steps include
start-up). Training rationales are fixed-length template text: content does not change
the cost of a step. Ray is a local cluster of its own (2 logical CPUs), never one
another process started. Writes benchmarks/results/students.json.

    python benchmarks/students.py      # defaults: 8 steps (3 warm-up), 32 patients, ~13 min
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import provenance, run_start, write_results

RESULTS = Path(__file__).parent / "results" / "students.json"
RATIONALE = (
    "The patient is {age:.0f} years old with an MMSE of {mmse:.0f}. The APOE4 count is "
    "{apoe:.0f}. Hippocampal volume and the other regional volumes are graded against "
    "age- and head-size-adjusted norms; together with the cognitive score they point to "
    "the diagnosis given below, because memory loss and medial temporal atrophy go together."
)
BATCH = {"text": 4, "vlm": 1}  # sequences per worker per step (text: 4 keeps the matmuls big)
INFERENCE_BATCH = 16  # patients a batch on every side (vLLM has batches_in_flight at once)
MAX_NEW_TOKENS = 96


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


def distill_config(steps: int = 8, batch_size: int = BATCH["text"]) -> Any:
    """What every training run here trains (placement aside): rationale then label."""
    from radiag.students.config import DistillConfig

    return DistillConfig.model_validate(
        {
            "loss": "rationale_label", "max_length": 512,
            "optim": {"max_steps": steps, "batch_size": batch_size},
            "checkpoint_every": steps,
            "mri": {"volumes": {"pixdim_mm": 4.0, "spatial_size": [48, 64, 48]}},
        }
    )  # fmt: skip


def train(
    run_dir: str,
    kind: str,
    workers: int,
    steps: int,
    warmup: int,
    threads: int = 1,
    batch_size: int | None = None,
    strategy: str = "ddp",
) -> dict[str, Any]:
    """One training run in a fresh copy of the checkpoints folder; steady-state throughput.

    Each worker gets `threads` torch threads and 0.9 logical CPU per thread (the rest of
    the 2 CPUs is for Ray Train's own actors); `batch_size` is per worker (default BATCH).
    """
    import shutil

    from radiag.store import RunStore
    from radiag.students.config import ScalingSettings, stage_dir
    from radiag.students.distill import run_distill

    store = RunStore(run_dir)
    shutil.rmtree(store.path(stage_dir(kind)), ignore_errors=True)  # each measurement trains anew
    batch_size = batch_size or BATCH[kind]
    cfg = distill_config(steps, batch_size).model_copy(
        update={"scaling": ScalingSettings(
            workers=workers, threads_per_worker=threads, cpus_per_worker=round(0.9 * threads, 2),
            strategy=strategy, zero_stage=2,
        )}
    )  # fmt: skip
    start = time.perf_counter()
    run_distill(kind, cfg, store)
    lines = Path(store.path(f"{stage_dir(kind)}/metrics.jsonl")).read_text().splitlines()
    steady = [json.loads(line) for line in lines][warmup:]
    return {
        "workers": workers,
        "threads_per_worker": threads,
        "batch_per_worker": batch_size,
        "strategy": strategy,
        "steps_measured": len(steady),
        "samples_per_s": round(statistics.median(m["samples_per_s"] for m in steady), 3),
        "tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in steady), 1),
        "step_seconds": round(statistics.median(m["step_seconds"] for m in steady), 3),
        "end_to_end_seconds": round(time.perf_counter() - start, 1),
    }


def matmul_peak(threads: int, dtype: str, seconds: float = 3.0) -> float:
    """GFLOP/s of the best (512 x 576) @ (576 x 1536) matmul with `threads` torch threads:
    the shape of the student's MLP projections over one batch."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.randn(512, 576, dtype=getattr(torch, dtype))
    b = torch.randn(576, 1536, dtype=getattr(torch, dtype))
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        best = max(best, 10 * 2 * 512 * 576 * 1536 / (time.perf_counter() - start) / 1e9)
    torch.set_num_threads(previous)
    return round(best, 1)


def matmul_flops_per_token(run_dir: str) -> dict[str, float]:
    """The matmul FLOPs a trained token of this run's sequences costs, by part, for the
    bundled Llama-style LM with LoRA (forward 2 x weights, activation gradients 2 x; frozen
    weights get no weight gradient, LoRA's do):
      projections  the layers' q, k, v, o, gate, up, down: 4 x their weights;
      lora         LoRA's A and B on its target modules: 6 x their weights;
      lm_head      the vocabulary projection (the tied embedding) at the positions whose
                   next token is labelled, the only logits the student computes;
      attention    causal Q K^T and A V: 2 x hidden FLOPs per query-key pair each
                   forward, twice that for their gradients.
    `projections_only` is the count this benchmark used up to c375432 (4 x the layers'
    weights), kept so the fractions stay comparable with the ones measured before.
    """
    from transformers import AutoConfig, AutoTokenizer

    from radiag.models import prepare_model
    from radiag.store import RunStore
    from radiag.students.distill import training_examples, training_sequences
    from radiag.students.formatting import IGNORE

    cfg = distill_config()
    model_dir = prepare_model(cfg.model)
    config = AutoConfig.from_pretrained(model_dir)
    examples = training_examples("text", cfg, RunStore(run_dir)).table
    sequences, _ = training_sequences(examples, cfg, AutoTokenizer.from_pretrained(model_dir))
    lengths = [len(s["input_ids"]) for s in sequences]
    tokens = sum(lengths)
    labelled = sum(sum(t != IGNORE for t in s["labels"][1:]) for s in sequences)

    h, layers, inner = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    shapes = {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inner), "up_proj": (h, inner), "down_proj": (inner, h),
    }  # fmt: skip
    per_layer = sum(i * o for i, o in shapes.values())
    lora = sum(cfg.lora.r * sum(shapes[name]) for name in cfg.lora.target_modules)
    parts = {
        "projections": 4.0 * layers * per_layer,
        "lora": 6.0 * layers * lora,
        "lm_head": 4.0 * config.vocab_size * h * labelled / tokens,
        "attention": 3 * 2 * h * layers * sum(n * n for n in lengths) / tokens,
    }
    return {
        "total": sum(parts.values()),
        **parts,
        "projections_only": parts["projections"],
        "mean_tokens_per_sequence": round(tokens / len(lengths), 1),
        "labelled_share": round(labelled / tokens, 3),
    }


def roofline(runs: dict[str, dict[str, Any]], flops: dict[str, float], dtype: str) -> dict:
    """Each run's share of the matmul peak of the cores it used, with every matmul a token
    needs counted (`fraction_by_run`) and with the layers' projections alone (the count
    used before, `projections_only_fraction_by_run`)."""
    peaks = {n: matmul_peak(n, dtype) for n in (1, 2)}

    def fractions(per_token: float) -> dict[str, float]:
        return {
            name: round(
                run["tokens_per_s"] * per_token / 1e9
                / peaks[run["workers"] * run["threads_per_worker"]], 3
            )
            for name, run in runs.items()
        }  # fmt: skip

    every = fractions(flops["total"])
    return {
        "dtype": dtype,
        "flops_per_token": flops,
        "matmul_peak_gflops_by_threads": peaks,
        "fraction_by_run": every,
        "best": max(every.values()),
        "projections_only_fraction_by_run": fractions(flops["projections_only"]),
    }


def training_dtype() -> str:
    """The dtype of the training matmuls: the default `precision: auto` resolved here."""
    from radiag.students.config import DistillConfig

    return "bfloat16" if DistillConfig().resolved().precision == "bf16-mixed" else "float32"


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return round(a["samples_per_s"] / b["samples_per_s"], 3)


def side(
    engine: str, patients: int, tokens: int, total_s: float, busy_s: float, steady: dict
) -> dict[str, Any]:
    """One inference side: end to end, start-up (all but the batches' own work), steady.

    `steady` holds the patients, output tokens and seconds the steady figures are taken over.
    """
    return {
        "engine": engine,
        "patients": patients,
        "output_tokens": tokens,
        "end_to_end": {
            "seconds": round(total_s, 1),
            "patients_per_s": round(patients / total_s, 3),
            "output_tokens_per_s": round(tokens / total_s, 1),
        },
        "startup_s": round(total_s - busy_s, 1),
        "steady": {
            "patients_per_s": round(steady["patients"] / steady["seconds"], 3),
            "output_tokens_per_s": round(steady["tokens"] / steady["seconds"], 1),
            **steady,
        },
    }


def inference(run_dir: str, patients: int) -> dict[str, Any]:
    """Teacher few-shot diagnosis vs the distilled text student, same test patients.

    Same engine on two sides: the student's zero-shot prompt is the teacher's diagnosis
    prompt with no exemplars, so the teacher stage with k=0 and the student's exported HF
    model is the student served by vLLM. Our transformers predictor is the third side.
    """
    import shutil

    from radiag.outputs import predictions_dir, read_parts
    from radiag.store import RunStore
    from radiag.students.config import StudentDiagnoseConfig, model_name, stage_dir
    from radiag.students.predict import run_student_diagnose
    from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
    from radiag.teacher.exemplars import ExemplarConfig
    from radiag.teacher.stages import DiagnoseConfig, run_teacher

    def vllm_diagnosis(store: RunStore, model: dict, exemplars: int, engine: str) -> dict:
        """Start-up: until the actor's engine is ready (`ready_at`); steady: from then until
        the last batch is back (exemplar choice, prompts, generation, writing the parts)."""
        cfg = DiagnoseConfig(
            engine=VllmEngineConfig(model=model, batch_size=INFERENCE_BATCH, max_model_len=2048),
            sampling=SamplingConfig(max_tokens=MAX_NEW_TOKENS, repetition_penalty=1.2),
            exemplars=ExemplarConfig(k=exemplars), limit=patients,
        )  # fmt: skip
        batches: list[dict[str, Any]] = []
        start = time.time()  # wall clock: `ready_at` comes from the actor's process
        run_teacher(
            "diagnose", cfg, store, on_batch=lambda b: batches.append(b | {"back": time.time()})
        )
        total = time.time() - start
        steady_s = max(b["back"] for b in batches) - min(b["ready_at"] for b in batches)
        done = sum(b["rows"] for b in batches)
        tokens = sum(b["output_tokens"] for b in batches)
        steady = {"patients": done, "tokens": tokens, "seconds": round(steady_s, 2),
                  "engine_busy_s": round(sum(b["engine_busy_s"] for b in batches), 2),
                  "forced_answer_tokens": sum(b["forced_answer_tokens"] for b in batches)}  # fmt: skip
        return side(engine, done, tokens, total, steady_s, steady)

    store = RunStore(run_dir)
    student_run = RunStore(tempfile.mkdtemp(prefix="radiag-bench-student-vllm-"))
    for name in ("splits", "rationales"):
        shutil.copytree(store.path(name), student_run.path(name))
    teacher = vllm_diagnosis(
        store, {"bundled": "smollm2-135m-instruct"}, 3, "vllm, few-shot k=3 (SmolLM2-135M)"
    )
    student_lm = {"path": store.path(f"{stage_dir('text')}/final/lm")}
    student_vllm = vllm_diagnosis(student_run, student_lm, 0, "vllm, zero-shot (exported student)")

    start = time.perf_counter()
    run_student_diagnose(
        "text",
        StudentDiagnoseConfig(limit=patients, batch_size=INFERENCE_BATCH, max_new_tokens=MAX_NEW_TOKENS),
        store,
    )  # fmt: skip
    total = time.perf_counter() - start
    # Each row's latency_s is its share of its batch's time in the predictor (input to answers).
    rows = read_parts(store, predictions_dir(model_name("text"))).to_pylist()
    busy = sum(r["latency_s"] for r in rows)
    tokens = sum(r["completion_tokens"] for r in rows)
    predictor = side(
        "transformers (radiag diagnose --model text)", len(rows), tokens, total, busy,
        {"patients": len(rows), "tokens": tokens, "seconds": round(busy, 2),
         "batches": -(-len(rows) // INFERENCE_BATCH)},
    )  # fmt: skip

    def speedup(student: dict[str, Any], key: str) -> dict[str, float]:
        """How many times the teacher's rate the student's is, end to end and steady."""
        return {
            "end_to_end": round(student["end_to_end"][key] / teacher["end_to_end"][key], 3),
            "steady": round(student["steady"][key] / teacher["steady"][key], 3),
        }

    return {
        "patients": patients,
        "batch_size": INFERENCE_BATCH,
        "max_new_tokens": MAX_NEW_TOKENS,
        "teacher": teacher,
        "student_vllm": student_vllm,
        "student_predictor": predictor,
        "student_vllm_vs_teacher_patients_per_s": speedup(student_vllm, "patients_per_s"),
        "student_predictor_vs_teacher_patients_per_s": speedup(predictor, "patients_per_s"),
        "student_vllm_vs_teacher_tokens_per_s": speedup(student_vllm, "output_tokens_per_s"),
        "student_predictor_vs_teacher_tokens_per_s": speedup(predictor, "output_tokens_per_s"),
        "note": "startup_s = end to end less the steady part: Ray Data and actor start, "
                "engine or model load, exemplar pool, reading the inputs and the outputs. "
                "Steady, vLLM sides: from the engine ready (the actor's ready_at) to the "
                "last batch back at the driver (batches run concurrently there, "
                "batches_in_flight); predictor: the sum of its batches' time in the "
                "predictor (latency_s; they run one after the other), which leaves out "
                "writing each part. Output tokens: tokens each side generated freely "
                "(vLLM's completion tokens, the forced final-answer tokens counted apart; "
                "the predictor's rationale tokens, its answer is scored, not generated). "
                "The same 135M base model on every side here, so the student's gain is "
                "the prompt (no exemplars: far fewer prompt tokens); with a 70B teacher "
                "the ratio also carries the model size",
    }  # fmt: skip


def main(
    steps: Annotated[int, typer.Option(help="optimizer steps per training run")] = 8,
    warmup: Annotated[int, typer.Option(help="first steps left out of the medians")] = 3,
    patients: Annotated[
        int,
        typer.Option(help="test patients for the inference comparison"),
    ] = 32,
    inference_only: Annotated[
        bool, typer.Option(help="re-measure only the inference comparison into the file")
    ] = False,
    out: Annotated[Path, typer.Option(help="results file")] = RESULTS,
) -> None:
    from radiag.pipeline import RayConfig, connect_ray

    started = run_start()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run_dir = tempfile.mkdtemp(prefix="radiag-bench-students-")
    # "local": always a new cluster of our own, never one another process `ray start`ed here.
    connect_ray(RayConfig(address="local", num_cpus=2))
    prepare_run(run_dir, subjects=300, imaged=48)
    if inference_only:
        train(run_dir, "text", 2, steps, warmup)  # the student the comparison uses
        results = json.loads(out.read_text())
        results["inference"] = inference(run_dir, patients)
        results["inference"]["measured"] = provenance(started)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["inference"], indent=2))
        return

    text = {"1x1": train(run_dir, "text", 1, steps, warmup)}
    deepspeed = train(run_dir, "text", 2, steps, warmup, strategy="deepspeed")
    text["1x2"] = train(run_dir, "text", 1, steps, warmup, threads=2, batch_size=2 * BATCH["text"])
    text["2x1"] = train(run_dir, "text", 2, steps, warmup)  # last: its student is the one inferred
    vlm = {n: train(run_dir, "vlm", n, steps, warmup) for n in (1, 2)}
    text_roofline = roofline(text, matmul_flops_per_token(run_dir), training_dtype())
    results = {
        "text_training_roofline_fraction": text_roofline["best"],
        "goal_text_training_roofline_fraction": 0.4,
        "distributed_efficiency_equal_cores": ratio(text["2x1"], text["1x2"]),
        "goal_distributed_efficiency_equal_cores": 0.9,
        "scaling_one_thread_per_worker": ratio(text["2x1"], text["1x1"]),
        "goal_scaling_one_thread_per_worker": 1.6,
        "text_student": {
            "model": "SmolLM2-135M-Instruct + LoRA r16",
            "runs": text,
            "roofline": text_roofline,
            "note": "runs named workers x threads; 1x2 takes 8 sequences a step, as 2x1 "
            "does (4 per worker), so the equal-cores pair does the same work a step",
        },
        "vlm_student": {
            "model": "DenseNet (small, 3D, 4 mm) -> 8 prefix tokens -> SmolLM2-135M + LoRA",
            "runs": list(vlm.values()),
            "scaling_one_thread_per_worker": ratio(vlm[2], vlm[1]),
        },
        "deepspeed_vs_ddp_2_workers": {
            "deepspeed_zero2": deepspeed,
            "ddp": text["2x1"],
            "ratio": ratio(deepspeed, text["2x1"]),
        },
        "inference": inference(run_dir, patients),
        **provenance(started),
    }
    write_results(out, results)


if __name__ == "__main__":
    typer.run(main)
