"""Benchmark: does the teacher write the same greedy text twice? bf16 against fp32, side by side.

A rationale set that changes from run to run trains other students, so a rerun of the
experiments preset is only a repeat if the teacher's temperature-0 text is. This asks the
bundled SmolLM2-135M-Instruct, through vLLM on this CPU, for the same rationalize prompts
(the synthetic cohort's training split, with their labels, as the stage asks) four times
in one engine, and counts the rows whose text equals the first answer's:

  repeat    the same prompts again (with prefix caching, their prompts are now cached);
  halves    the first half of the prompts, then the second: other rows share each batch;
  reversed  the prompts in reverse order.

Each configuration runs in a fresh process of its own, one after the other:
`bfloat16` with prefix caching (what `dtype: auto` gives on a CPU with native bf16, and
the stage's default), `bfloat16` without it, and `float32`. `generate_s` is the first
call's time, so the configurations' speeds compare too. Writes
benchmarks/results/teacher_repeatability.json.

    python benchmarks/teacher_repeatability.py --rows 64
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import provenance, run_start, write_results
from teacher_throughput import hand_back, in_fresh_process, prepare_run

RESULTS = Path(__file__).parent / "results" / "teacher_repeatability.json"
SETUPS = {  # name: (dtype, prefix caching)
    "bfloat16": ("bfloat16", True),
    "bfloat16_no_prefix_cache": ("bfloat16", False),
    "float32": ("float32", True),
}


def measure(conversations: list, dtype: str, prefix_cache: bool, max_tokens: int) -> dict:
    """One configuration in a fresh process (an engine per process, ended with its group)."""
    return in_fresh_process(_measure, conversations, dtype, prefix_cache, max_tokens)


def _measure(
    results: Any, conversations: list, dtype: str, prefix_cache: bool, max_tokens: int
) -> None:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from radiag.teacher.engines import VllmEngineConfig
    from radiag.teacher.vllm_engine import render, start_llm

    engine = VllmEngineConfig(
        dtype=dtype, enable_prefix_caching=prefix_cache, cpu_threads_bind="0-1"
    )
    llm = start_llm(engine)
    tokenizer = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=render(tokenizer, c)) for c in conversations]
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.2)

    def texts(batch: list) -> list[str]:
        return [o.outputs[0].text for o in llm.generate(batch, greedy, use_tqdm=False)]

    start = time.perf_counter()
    first = texts(prompts)
    generate_s = time.perf_counter() - start
    half = len(prompts) // 2
    again = {
        "repeat": texts(prompts),
        "halves": texts(prompts[:half]) + texts(prompts[half:]),
        "reversed": texts(prompts[::-1])[::-1],
    }
    hand_back(
        results,
        {"dtype": dtype, "prefix_caching": prefix_cache, "generate_s": round(generate_s, 1)}
        | {
            f"same_as_first_{name}": sum(a == b for a, b in zip(first, other, strict=True))
            for name, other in again.items()
        },
    )


def main(
    rows: Annotated[int, typer.Option(help="rationalize prompts asked each time")] = 64,
    max_tokens: Annotated[int, typer.Option(help="new tokens per answer")] = 96,
) -> None:
    started = run_start()
    conversations = prepare_run(tempfile.mkdtemp(prefix="radiag-bench-"), rows)
    setups = {
        name: measure(conversations, dtype, cache, max_tokens)
        for name, (dtype, cache) in SETUPS.items()
    }
    report = {
        "benchmark": "greedy teacher text asked again in one vLLM CPU engine: rows that repeat",
        "rows": rows,
        "max_tokens": max_tokens,
        "setups": setups,
        "float32_time_over_bfloat16": round(
            setups["float32"]["generate_s"] / setups["bfloat16"]["generate_s"], 2
        ),
    } | provenance(started)
    write_results(RESULTS, report)


if __name__ == "__main__":
    typer.run(main)
