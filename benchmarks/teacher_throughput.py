"""Benchmark: teacher generation through the full pipeline vs the bare vLLM engine.

Side by side in one run, on the same machine, prompts, model and sampling:
  bare      `vllm.LLM.generate` on all prompts at once (the engine's best case);
  pipeline  `run_teacher("rationalize", ...)`: Ray Data actor, prompts, parsing, QC,
            Parquet part files, resume bookkeeping.
Output tokens/s are steady state for both: engine start-up is excluded (the bare
engine is timed after its start, the pipeline from its first finished batch to its
last, counting the batches after the first). End-to-end figures, start-up included,
are reported too. Writes benchmarks/results/teacher.json.

    python benchmarks/teacher_throughput.py --rows 192 --max-tokens 96
"""

from __future__ import annotations

import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

RESULTS = Path(__file__).parent / "results" / "teacher.json"


def prepare_run(store_uri: str, rows: int) -> None:
    from radiag.cohort.describe import DescribeConfig
    from radiag.cohort.split import SplitConfig
    from radiag.cohort.stages import IngestConfig, describe_and_split, ingest
    from radiag.cohort.synthetic import SynthConfig
    from radiag.store import RunStore

    store = RunStore(store_uri)
    ingest(IngestConfig(synthetic=SynthConfig(subjects=int(rows / 0.68) + 20, max_visits=1)), store)
    describe_and_split(DescribeConfig(), SplitConfig(), store)


def bare(cfg, prompts: list, sampling) -> dict[str, float]:
    """The bare engine: `vllm.LLM.generate` on every prompt at once."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from radiag.teacher.vllm_engine import start_llm

    started = time.perf_counter()
    llm = start_llm(cfg)
    startup = time.perf_counter() - started
    tokenizer = llm.get_tokenizer()
    token_ids = [
        tokenizer.encode(
            tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for p in prompts
    ]
    params = SamplingParams(
        temperature=sampling.temperature, max_tokens=sampling.max_tokens, seed=sampling.seed
    )
    llm.generate([TokensPrompt(prompt_token_ids=token_ids[0])], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm
    gc.collect()
    return {
        "output_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds,
        "requests_per_s": len(prompts) / seconds,
        "startup_s": startup,
    }


def pipeline(cfg, store_uri: str) -> dict[str, float]:
    """The full rationalize stage; steady state from the first finished batch to the last."""
    from radiag.pipeline import RayConfig, connect_ray
    from radiag.store import RunStore
    from radiag.teacher.stages import run_teacher

    connect_ray(RayConfig(num_cpus=2))
    arrivals: list[tuple[float, int, int]] = []
    start = time.perf_counter()
    run_teacher(
        "rationalize",
        cfg,
        RunStore(store_uri),
        on_batch=lambda b: arrivals.append((time.perf_counter(), b["rows"], b["output_tokens"])),
    )
    total = time.perf_counter() - start
    (first, *rest), end = arrivals, arrivals[-1][0]
    steady_s = end - first[0]
    steady_tokens = sum(tokens for _, _, tokens in rest)
    steady_rows = sum(rows for _, rows, _ in rest)
    all_tokens = sum(tokens for _, _, tokens in arrivals)
    return {
        "output_tokens": all_tokens,
        "batches": len(arrivals),
        "steady_seconds": steady_s,
        "output_tokens_per_s": steady_tokens / steady_s,
        "requests_per_s": steady_rows / steady_s,
        "end_to_end_seconds": total,
        "end_to_end_output_tokens_per_s": all_tokens / total,
    }


def main(
    model: Annotated[
        str, typer.Option(help="'bundled' (SmolLM2-135M) or an HF directory (e.g. a tiny model)")
    ] = "bundled",
    rows: Annotated[int, typer.Option(help="training patients rationalized")] = 192,
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer")] = 96,
    batch_size: Annotated[int, typer.Option(help="rows per pipeline engine call")] = 32,
    threads_bind: Annotated[str, typer.Option(help="VLLM_CPU_OMP_THREADS_BIND for both")] = "0-1",
    label: Annotated[str, typer.Option(help="key in the results file")] = "smollm2-135m",
) -> None:
    from radiag.cohort.schema import Label
    from radiag.store import RunStore
    from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
    from radiag.teacher.prompts import rationalize_messages
    from radiag.teacher.stages import RationalizeConfig

    spec = {"bundled": "smollm2-135m-instruct"} if model == "bundled" else {"path": model}
    engine = VllmEngineConfig(
        model=spec, batch_size=batch_size, cpu_threads_bind=threads_bind, max_model_len=2048
    )
    sampling = SamplingConfig(max_tokens=max_tokens)
    # No regeneration, no answer step: both sides generate each prompt exactly once.
    cfg = RationalizeConfig(
        engine=engine,
        sampling=sampling,
        limit=rows,
        regeneration_attempts=0,
        constrain_answer=False,
    )

    run_dir = tempfile.mkdtemp(prefix="radiag-bench-")
    prepare_run(run_dir, rows)
    train = (
        RunStore(run_dir).read_table("splits/train.parquet").sort_by("patient_id").slice(0, rows)
    )
    prompts = [
        rationalize_messages(d, Label(lbl))
        for d, lbl in zip(train["description"].to_pylist(), train["label"].to_pylist(), strict=True)
    ]
    bare_result = bare(engine, prompts, sampling)
    pipeline_result = pipeline(cfg, run_dir)

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = results.setdefault("runs", {})
    runs[label] = {
        "model": model,
        "rows": len(prompts),
        "max_tokens": max_tokens,
        "pipeline_batch_size": batch_size,
        "bare": {k: round(v, 3) for k, v in bare_result.items()},
        "pipeline": {k: round(v, 3) for k, v in pipeline_result.items()},
        "ratio_pipeline_vs_bare": round(
            pipeline_result["output_tokens_per_s"] / bare_result["output_tokens_per_s"], 3
        ),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    # The headline is the worst run: every model measured must meet the goal.
    results["ratio_pipeline_vs_bare"] = min(r["ratio_pipeline_vs_bare"] for r in runs.values())
    results["goal_ratio"] = 0.9
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(runs[label], indent=2))


if __name__ == "__main__":
    typer.run(main)
