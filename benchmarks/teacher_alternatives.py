"""Benchmark: the rationalize stage's CPU layouts, and `ray.data.llm`, on the same work.

Three sides, one after another in one run, on the same real rationalize prompts with the
same greedy sampling (stop at EOS or `--max-tokens`), on one local Ray cluster that is
already running (its start is not counted on any side):

  stage_one_replica_two_cores   the stage, replicas 1, cpu_threads_bind "0-1";
  stage_two_replicas_one_core   the stage, replicas 2, cpu_threads_bind ["0", "1"]: each
                                engine claims its own core (vLLM's "auto" would pin both
                                engines to the same one);
  ray_data_llm                  `ray.data.llm.build_processor` with a vLLM engine on both
                                cores ("0-1"), the same model and engine arguments, its
                                CPU-only stage settings, output written to Parquet.

Each side's seconds run from the call to the last row written, its engine start-up
included; output tokens are counted by vLLM on every side. The forced final line and QC
regeneration are off on the stage, since `ray.data.llm` does neither. The cluster has 4
logical CPUs so that two engine actors (one CPU each) leave room for Ray Data's read and
write tasks; the processes still share this machine's 2 cores.
Writes benchmarks/results/teacher_alternatives.json.

    python benchmarks/teacher_alternatives.py --rows 500 --max-tokens 64
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import provenance, run_start
from teacher_throughput import pipeline, prepare_run

RESULTS = Path(__file__).parent / "results" / "teacher_alternatives.json"
LIGHT = {"num_cpus": 0.1}  # ray.data.llm's helper stages, so 2 cores do not deadlock


def ray_data_llm(engine, conversations: list, max_tokens: int) -> dict[str, Any]:
    """The prompts through `ray.data.llm`, configured as the stage's engine."""
    import pyarrow.parquet as pq
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from radiag.models import prepare_model
    from radiag.teacher.vllm_engine import engine_args

    args = engine_args(engine)
    config = vLLMEngineProcessorConfig(
        model_source=str(prepare_model(engine.model)),
        engine_kwargs={k: v for k, v in args.items() if k not in ("model", "seed")},
        runtime_env={
            "env_vars": {
                "VLLM_CPU_OMP_THREADS_BIND": engine.cpu_threads_bind,
                "VLLM_CPU_KVCACHE_SPACE": str(engine.cpu_kv_cache_gib),
            }
        },
        placement_group_config={"bundles": [{"CPU": 1}]},
        concurrency=1,
        batch_size=engine.batch_size,
        max_concurrent_batches=engine.batches_in_flight,
        chat_template_stage={"enabled": True, **LIGHT},
        tokenize_stage={"enabled": True, **LIGHT},
        detokenize_stage={"enabled": True, **LIGHT},
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "messages": row["messages"],
            "sampling_params": {"temperature": 0.0, "max_tokens": max_tokens},
        },
        postprocess=lambda row: {
            "id": row["id"],
            "text": row["generated_text"],
            "output_tokens": row["num_generated_tokens"],
        },
        preprocess_map_kwargs=LIGHT,
        postprocess_map_kwargs=LIGHT,
    )
    out = tempfile.mkdtemp(prefix="radiag-bench-rdl-")
    items = [{"id": i, "messages": c} for i, c in enumerate(conversations)]
    asked = time.time()
    processor(ray.data.from_items(items)).write_parquet(out)
    seconds = time.time() - asked
    table = pq.read_table(out)
    tokens = sum(table["output_tokens"].to_pylist())
    return {
        "rows": table.num_rows,
        "distinct_ids": len(set(table["id"].to_pylist())),
        "output_tokens": tokens,
        "stage_s": round(seconds, 2),
        "end_to_end_tokens_per_s": round(tokens / seconds, 1),
    }


def main(
    rows: Annotated[int, typer.Option(help="training rows rationalized by each side")] = 500,
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer at most")] = 64,
) -> None:
    from radiag.pipeline import RayConfig, connect_ray
    from radiag.teacher.engines import SamplingConfig, VllmEngineConfig
    from radiag.teacher.stages import RationalizeConfig

    started = run_start()
    base_run = tempfile.mkdtemp(prefix="radiag-bench-")
    conversations = prepare_run(base_run, rows)
    connect_ray(RayConfig(address="local", num_cpus=4))
    layouts = {
        "stage_one_replica_two_cores": VllmEngineConfig(replicas=1, cpu_threads_bind="0-1"),
        "stage_two_replicas_one_core": VllmEngineConfig(replicas=2, cpu_threads_bind=["0", "1"]),
    }
    plain = RationalizeConfig(
        sampling=SamplingConfig(max_tokens=max_tokens), limit=rows, regeneration_attempts=0,
        constrain_answer=False,
    )  # fmt: skip
    sides = {
        name: pipeline(plain.model_copy(update={"engine": engine}), base_run)
        for name, engine in layouts.items()
    }
    sides["ray_data_llm"] = ray_data_llm(
        layouts["stage_one_replica_two_cores"], conversations, max_tokens
    )

    def vs_one_replica(side: str, rate: str = "end_to_end_tokens_per_s") -> float:
        return round(sides[side][rate] / sides["stage_one_replica_two_cores"][rate], 3)

    report = {
        "benchmark": "rationalize stage: 1 CPU engine x 2 cores vs 2 x 1 core vs ray.data.llm "
        "(bundled SmolLM2-135M-Instruct)",
        "rows": rows,
        "max_tokens": max_tokens,
        "ray_logical_cpus": 4,
        "two_replicas_vs_one": vs_one_replica("stage_two_replicas_one_core"),
        "two_replicas_vs_one_steady": vs_one_replica(
            "stage_two_replicas_one_core", "steady_tokens_per_s"
        ),
        "ray_data_llm_vs_stage": vs_one_replica("ray_data_llm"),
        **sides,
        "configs": {
            name: engine.model_dump(mode="json", exclude={"model"})
            for name, engine in layouts.items()
        },
    } | provenance(started)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
