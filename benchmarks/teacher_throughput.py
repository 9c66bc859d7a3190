"""Benchmark: the rationalize stage against the bare vLLM engine, side by side in one run.

Same machine, model, prompts (real rationalize prompts of the synthetic cohort's
training split) and sampling (greedy, stop at EOS or `--max-tokens`) on both sides. The
bundled 135M model's greedy rationales run 125-490 tokens when they end at all, so the
default 160 lets some rows stop at EOS while keeping 1,000 rows to about 12 minutes a
side; `rows_stopped_at_eos` says how many did:

  bare      `vllm.LLM.generate` on every prompt at once, in its best configuration on
            this machine: `max_num_seqs` swept first on `--sweep-rows` prompts, the
            fastest without preemption kept;
  pipeline  `run_teacher("rationalize")` with the default engine config: Ray Data
            actor, async engine, prompts, parsing, QC, Parquet part files, resume
            bookkeeping. The forced final line and QC regeneration are off here, since
            the bare engine does neither; they are measured apart (`steps`).

Figures (each side's start-up is timed the same way: from asking for an engine to the
engine being ready; the stage's Ray cluster start is reported apart as `ray_start_s`):
  ratio_end_to_end      output tokens/s, start-up included on both sides;
  ratio_steady          output tokens/s from the engine being ready to the last output;
  engine_busy_fraction  seconds the pipeline's engine had requests in flight / seconds
                        from its being ready to the stage's last output;
  steps                 extra steady seconds per row of the forced final line, and of QC
                        regeneration on top of it, over the plain pipeline;
  roofline              2 x parameters FLOPs per output token against this CPU's measured
                        matmul peak, and the share each side reached.
Writes benchmarks/results/teacher.json.

    python benchmarks/teacher_throughput.py --rows 1000 --max-tokens 160
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import provenance, run_start

RESULTS = Path(__file__).parent / "results" / "teacher.json"
GOALS = {"ratio_end_to_end": 0.9, "engine_busy_fraction": 0.95}


def prepare_run(run_dir: str, rows: int) -> list[list[dict[str, str]]]:
    """A run with the synthetic cohort's splits; the prompts of its first `rows` train rows,
    in the order the stage takes them."""
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.schema import Label
    from radiag.cohort.split import SplitConfig, first_patients
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
    from radiag.cohort.synthetic import SynthConfig
    from radiag.store import RunStore
    from radiag.teacher.prompts import rationalize_messages

    store = RunStore(run_dir)
    ingest(IngestConfig(synthetic=SynthConfig(subjects=int(rows / 0.68) + 40, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)
    train = first_patients(store.read_table("splits/train.parquet"), rows)
    assert train.num_rows == rows, f"the cohort has {train.num_rows} training rows, not {rows}"
    return [
        rationalize_messages(d, Label(label))
        for d, label in zip(train["description"].to_pylist(), train["label"].to_pylist(), strict=True)
    ]  # fmt: skip


def in_fresh_process(child: Callable[..., None], *args: Any) -> Any:
    """`child(results, *args)` in a spawned process that leads a process group of its own:
    what it hands back (`hand_back`)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=_group_leader, args=(child, results, *args))
    process.start()
    result = results.get()
    process.join()  # killed with its process group once the figures are handed back
    return result


def _group_leader(child: Callable[..., None], results: Any, *args: Any) -> None:
    os.setpgrp()
    child(results, *args)


def hand_back(results: Any, figures: dict[str, Any]) -> None:
    """A child's last act: hand its figures back, then end every process it started.

    vLLM's own teardown in a child process can hang, and its engine core outlives a parent
    that merely exits (each one left holds about 4 GiB), so the child leads a process group
    of its own (`in_fresh_process`) and ends the whole group at once."""
    results.put(figures)
    results.close()
    results.join_thread()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def bare(engine, conversations: list, sampling, max_num_seqs: int) -> dict[str, Any]:
    """`vllm.LLM.generate` on every prompt at once, in a fresh process as a user's script
    would be, so its start-up includes importing vLLM just as the pipeline's actor does."""
    return in_fresh_process(_bare, engine, conversations, sampling, max_num_seqs)


def _bare(results: Any, engine, conversations: list, sampling, max_num_seqs: int) -> None:
    """The child: measures, then hands the figures back and ends (`hand_back`)."""
    started = time.perf_counter()
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from radiag.teacher.vllm_engine import render, start_llm

    llm = start_llm(engine, max_num_seqs=max_num_seqs, disable_log_stats=False)
    startup_s = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=render(tokenizer, c)) for c in conversations]
    params = [
        SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            max_tokens=min(sampling.max_tokens, engine.max_model_len - len(p["prompt_token_ids"])),
            seed=sampling.seed,
        )
        for p in prompts
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    generate_s = time.perf_counter() - start
    preemptions = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    hand_back(
        results,
        {
            "max_num_seqs": max_num_seqs,
            "rows": len(prompts),
            "rows_stopped_at_eos": sum(o.outputs[0].finish_reason == "stop" for o in outputs),
            "output_tokens": tokens,
            "startup_s": round(startup_s, 2),
            "generate_s": round(generate_s, 2),
            "preemptions": int(preemptions),
            "steady_tokens_per_s": round(tokens / generate_s, 1),
            "end_to_end_tokens_per_s": round(tokens / (startup_s + generate_s), 1),
        },
    )


def pipeline(cfg, base_run: str) -> dict[str, Any]:
    """The rationalize stage on a fresh copy of the prepared run."""
    from radiag.store import RunStore
    from radiag.teacher.stages import read_output, run_teacher

    run_dir = tempfile.mkdtemp(prefix="radiag-bench-stage-")
    shutil.copytree(base_run, run_dir, dirs_exist_ok=True)
    batches: list[dict[str, Any]] = []
    asked = time.time()
    summary = run_teacher(
        "rationalize", cfg, RunStore(run_dir), on_batch=lambda b: batches.append(b | {"at": time.time()})
    )  # fmt: skip
    stage_s = time.time() - asked
    end = max(b["at"] for b in batches)
    ready = {b["ready_at"] for b in batches}  # one per engine replica
    window_s = end - min(ready)
    tokens = sum(b["output_tokens"] for b in batches)
    finished = read_output(RunStore(run_dir), "rationalize")["finish_reason"].to_pylist()
    shutil.rmtree(run_dir)
    return {
        "rows": summary.rows,
        "rows_stopped_at_eos": finished.count("stop"),
        "output_tokens": tokens,
        "startup_s": round(min(ready) - asked, 2),
        "steady_s": round(window_s, 2),
        "stage_s": round(stage_s, 2),
        "steady_tokens_per_s": round(tokens / window_s, 1),
        "end_to_end_tokens_per_s": round(tokens / stage_s, 1),
        "engine_busy_fraction": round(
            sum(b["engine_busy_s"] for b in batches) / sum(end - r for r in ready), 3
        ),
        "forced_answer_tokens": sum(b["forced_answer_tokens"] for b in batches),
        "regenerated_rows": sum(b["regenerated_rows"] for b in batches),
        "regenerated_tokens": sum(b["regenerated_tokens"] for b in batches),
        "qc_flagged": summary.qc_flagged,
        "unparsed": summary.unparsed,
        "errors": summary.errors,
    }


def matmul_peak_gflops(threads: int) -> dict[str, float]:
    """The best of a few large square matmuls per dtype, on `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b  # warm-up
        seconds = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - start)
        peaks[str(dtype).removeprefix("torch.")] = round(2 * 2048**3 / min(seconds) / 1e9, 1)
    return peaks


def parameters(model_dir: Path) -> int:
    """Parameters stored in the model's safetensors files (tied embeddings counted once)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    return total


def main(
    rows: Annotated[int, typer.Option(help="training rows rationalized by each side")] = 1000,
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer at most")] = 160,
    sweep: Annotated[str, typer.Option(help="bare max_num_seqs values tried")] = "32,64,128",
    sweep_rows: Annotated[int, typer.Option(help="prompts per sweep point")] = 128,
    steps_rows: Annotated[int, typer.Option(help="rows of the forced-answer and QC runs")] = 128,
    threads_bind: Annotated[
        str, typer.Option(help="VLLM_CPU_OMP_THREADS_BIND, both sides")
    ] = "0-1",
) -> None:
    from radiag.models import prepare_model
    from radiag.pipeline import RayConfig, connect_ray
    from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
    from radiag.teacher.stages import RationalizeConfig

    started = run_start()
    engine = VllmEngineConfig(cpu_threads_bind=threads_bind)
    sampling = SamplingConfig(max_tokens=max_tokens)
    base_run = tempfile.mkdtemp(prefix="radiag-bench-")
    conversations = prepare_run(base_run, rows)
    model_dir = prepare_model(engine.model)

    candidates = [int(v) for v in sweep.split(",")]
    swept = [bare(engine, conversations[:sweep_rows], sampling, n) for n in candidates]
    best = max((s for s in swept if s["preemptions"] == 0), key=lambda s: s["steady_tokens_per_s"])
    bare_full = bare(engine, conversations, sampling, best["max_num_seqs"])

    mark = time.perf_counter()
    connect_ray(RayConfig(address="local", num_cpus=2))
    ray_start_s = time.perf_counter() - mark
    plain = RationalizeConfig(
        engine=engine, sampling=sampling, limit=rows, regeneration_attempts=0, constrain_answer=False
    )  # fmt: skip
    piped = pipeline(plain, base_run)
    forced = pipeline(
        plain.model_copy(update={"limit": steps_rows, "constrain_answer": True}), base_run
    )
    default = pipeline(
        RationalizeConfig(engine=engine, sampling=sampling, limit=steps_rows), base_run
    )

    def per_row(run: dict[str, Any]) -> float:
        return run["steady_s"] / run["rows"]

    peaks = matmul_peak_gflops(threads=2)
    flops_per_token = 2 * parameters(model_dir)
    peak = max(peaks.values()) * 1e9
    report = {
        "benchmark": "rationalize stage vs bare vLLM engine (bundled SmolLM2-135M-Instruct, CPU)",
        "rows": rows,
        "max_tokens": max_tokens,
        "ratio_end_to_end": round(
            piped["end_to_end_tokens_per_s"] / bare_full["end_to_end_tokens_per_s"], 3
        ),
        "ratio_steady": round(piped["steady_tokens_per_s"] / bare_full["steady_tokens_per_s"], 3),
        "engine_busy_fraction": piped["engine_busy_fraction"],
        "goals": GOALS,
        "bare": {"sweep": swept, "best_max_num_seqs": best["max_num_seqs"], "run": bare_full},
        "pipeline": piped | {"ray_start_s": round(ray_start_s, 2)},
        "pipeline_config": plain.engine.model_dump(mode="json", exclude={"model"}),
        "steps": {
            "rows": steps_rows,
            "forced_answer": forced,
            "forced_answer_and_qc_regeneration": default,
            "forced_answer_extra_s_per_row": round(per_row(forced) - per_row(piped), 4),
            "qc_regeneration_extra_s_per_row": round(per_row(default) - per_row(forced), 4),
            "plain_s_per_row": round(per_row(piped), 4),
        },
        "roofline": {
            "parameters": flops_per_token // 2,
            "flops_per_token": flops_per_token,
            "matmul_peak_gflops": peaks,
            "bare_share_of_peak": round(
                bare_full["steady_tokens_per_s"] * flops_per_token / peak, 4
            ),
            "pipeline_share_of_peak": round(
                piped["steady_tokens_per_s"] * flops_per_token / peak, 4
            ),
        },
    } | provenance(started)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
