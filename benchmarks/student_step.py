"""Benchmark: where one training step of the text student spends its time.

`students.py` measures how fast the text student trains and what share of the matmul peak
that is (`text_training_roofline_fraction`). This says why the share is what it is: the
student of that benchmark (SmolLM2-135M + LoRA, rationale then label, its template
sequences, 4 per step, the precision `auto` resolves to) trains one worker's steps in this
process with one torch thread, as a 1x1 run does without Ray, and torch.profiler splits the
profiled steps' CPU time by kind of op (`share_by_kind`, self time: an op's children count
in their own kind):
  matmul     the layers' projections, LoRA and the vocabulary projection (aten::mm / bmm /
             addmm), with their gradients;
  attention  scaled dot-product attention, forward and backward;
  casts      dtype conversions (aten::copy_ / _to_copy): autocast's bf16 copies of fp32
             tensors, RMSNorm's float32 round trip, the fp32 logits;
  softmax    the log-softmax of the cross-entropy over the vocabulary, and its gradient;
  elementwise  every other aten op (mul, add, SiLU, RMSNorm's pow and rsqrt, the optimizer's
             updates, fills);
  other      what is not an aten op (autograd bookkeeping, Python).
`matmul_only_fraction` is the roofline fraction a step made of its matmuls alone would
reach: the measured fraction over the matmul share.

Side by side, alternating step for step on the same model: the student as the training loop
builds it (LoRA reads its bf16 input as it is) against PEFT's default, which casts each
adapter's input to the fp32 adapter weights for autocast to cast back
(`speedup_over_peft_casts`); and the same decoder layers compiled by `torch.compile`
(inductor, dynamic shapes: the loop's batches differ in length), which fuses the
elementwise ops of a layer, against the layers as they run eagerly (`speedup_compiled`,
`roofline_fraction_compiled`; `compile_seconds` is the first compiled step, compile
included).

Whether any change outside the two heaviest kernels could reach the goal: one step's
attention, forward and backward over every layer, timed on the step's shapes under each
CPU kernel torch offers (`attention_seconds_by_kernel`), and `roofline_ceiling`, the
fraction a step would reach if its matmuls took the time they take in the profile, its
attention the fastest kernel's time, and every other op (elementwise, casts, the
vocabulary softmax, the optimizer) no time at all; `roofline_ceiling_matmuls_at_peak`, the
same with the matmuls at the peak. Writes
benchmarks/results/student_step.json.

    python benchmarks/student_step.py      # ~4 min
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import cpu_and_precision, provenance, run_start
from students import (
    distill_config,
    matmul_flops_per_token,
    matmul_peak,
    prepare_run,
    training_dtype,
)

RESULTS = Path(__file__).parent / "results" / "student_step.json"
KINDS = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product",),
    "casts": ("aten::copy_", "aten::_to_copy", "aten::to"),
    "softmax": ("log_softmax", "nll_loss"),
}


def kind_of(op: str) -> str:
    """The kind (module docstring) an op of the profile belongs to."""
    for kind, names in KINDS.items():
        if any(name in op for name in names):
            return kind
    return "elementwise" if op.startswith("aten::") else "other"


def training_step(run_dir: str, batch_size: int) -> tuple[Any, list[int], Any]:
    """One worker's step of the benchmark's text student, as `training.train_loop` runs it,
    the lengths of the sequences a step trains, and the model."""
    import torch
    from transformers import AutoTokenizer

    from radiag.models import prepare_model
    from radiag.store import RunStore
    from radiag.students.distill import training_examples, training_sequences
    from radiag.students.training import (
        build_student,
        student_optimizer,
        training_autocast,
        training_loss,
    )

    cfg = distill_config(batch_size=batch_size).resolved()
    model_dir = prepare_model(cfg.model)
    examples = training_examples("text", cfg, RunStore(run_dir)).table
    sequences, _ = training_sequences(examples, cfg, AutoTokenizer.from_pretrained(model_dir))
    batch = sequences[:batch_size]
    ids, labels = [s["input_ids"] for s in batch], [s["labels"] for s in batch]
    answer, kinds = [s["answer_mask"] for s in batch], [s["kind"] for s in batch]
    model = build_student("text", cfg, model_dir)
    params, optimizer = student_optimizer(model, cfg)
    autocast = training_autocast(model, cfg)

    def step() -> None:  # DdpStrategy.backward_and_step's order, without the process group
        with autocast:
            nll = model(ids, labels, None)
        loss, _ = training_loss(nll, labels, answer, kinds, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()

    return step, [len(row) for row in ids], model


def attention_kernels(
    lengths: list[int], head_dim: int, dtype: str
) -> dict[str, tuple[str, Callable[[Any, Any, Any], Any]]]:
    """The CPU attention kernels torch offers, each with the dtype it runs in, for rows of
    `lengths` padded on the right; on every real token they compute the same attention:
      sdpa_mask     scaled_dot_product_attention with the padding mask, in `dtype` (the loop's);
      sdpa_causal   the same, causal without a mask (rows padded on the right need none);
      sdpa_float32  the causal kernel in float32;
      explicit      two batched matmuls in `dtype` around a float32 softmax."""
    import torch

    sdpa = torch.nn.functional.scaled_dot_product_attention
    width = max(lengths)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    real = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # (B, T) keys
    padding_mask = (causal & real[:, None, :])[:, None]  # (B, 1, T, T)

    def explicit(q: Any, k: Any, v: Any) -> Any:
        scores = (q @ k.transpose(-1, -2)).float() * head_dim**-0.5
        return scores.masked_fill(~causal, float("-inf")).softmax(-1).to(q.dtype) @ v

    return {
        "sdpa_mask": (dtype, lambda q, k, v: sdpa(q, k, v, attn_mask=padding_mask)),
        "sdpa_causal": (dtype, lambda q, k, v: sdpa(q, k, v, is_causal=True)),
        "sdpa_float32": ("float32", lambda q, k, v: sdpa(q, k, v, is_causal=True)),
        "explicit": (dtype, explicit),
    }


def attention_seconds(
    lengths: list[int], lm_config: Any, dtype: str, repeats: int
) -> dict[str, float]:
    """Median seconds of one step's attention, forward and backward over every decoder layer,
    on the step's shapes and the LM's heads, per kernel of `attention_kernels`. The key/value
    heads come repeated to the query heads; that copy is not timed."""
    import torch

    heads, layers = lm_config.num_attention_heads, lm_config.num_hidden_layers
    head_dim = lm_config.hidden_size // heads
    shape = (len(lengths), heads, max(lengths), head_dim)
    seconds = {}
    for name, (kernel_dtype, attend) in attention_kernels(lengths, head_dim, dtype).items():
        q, k, v, grad = (torch.randn(shape, dtype=getattr(torch, kernel_dtype)) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        times = []
        for _ in range(repeats + 1):  # the first warms up
            start = time.perf_counter()
            torch.autograd.grad(attend(q, k, v), (q, k, v), grad)
            times.append(time.perf_counter() - start)
        seconds[name] = round(statistics.median(times[1:]) * layers, 3)
    return seconds


def swap_layers(decoder: Any, layers: list[Any]) -> None:
    """Run the LM's decoder layers (`decoder`, its ModuleList) as `layers`: the same
    weights, eager or compiled."""
    for i, layer in enumerate(layers):
        decoder[i] = layer


def alternate(
    step: Callable[[], None], switches: dict[str, Callable[[], None]], steps: int
) -> dict[str, float]:
    """Median seconds of a step under each switch, alternating switch for switch, so that
    a machine that speeds up or slows down during the run affects every side alike."""
    seconds: dict[str, list[float]] = {name: [] for name in switches}
    for _ in range(steps):
        for name, switch in switches.items():
            switch()
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(
    steps: Annotated[int, typer.Option(help="timed steps of each side (after 3 warm-up)")] = 6,
    profiled: Annotated[int, typer.Option(help="steps under the profiler")] = 2,
    batch_size: Annotated[int, typer.Option(help="sequences a step")] = 4,
) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from radiag.students.training import lora_input_casts

    started = run_start()
    torch.set_num_threads(1)
    run_dir = tempfile.mkdtemp(prefix="radiag-step-")
    prepare_run(run_dir, subjects=80, imaged=2)
    step, lengths, model = training_step(run_dir, batch_size)
    tokens = sum(lengths)
    for _ in range(3):
        step()
    casts = alternate(
        step,
        {"peft": lambda: lora_input_casts(model, True), "loop": lambda: lora_input_casts(model, False)},
        steps,
    )  # fmt: skip
    lora_input_casts(model, False)  # as the loop trains
    decoder = model.lm.get_base_model().model.layers
    eager = list(decoder)
    compiled = [torch.compile(layer, dynamic=True) for layer in eager]
    swap_layers(decoder, compiled)
    start = time.perf_counter()
    step()
    compile_seconds = time.perf_counter() - start
    fused = alternate(
        step,
        {"eager": lambda: swap_layers(decoder, eager), "compiled": lambda: swap_layers(decoder, compiled)},
        steps,
    )  # fmt: skip
    swap_layers(decoder, eager)  # as the loop trains
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profiled):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = {}
    for e in events:
        kind = kind_of(e.key)
        by_kind[kind] = by_kind.get(kind, 0.0) + e.self_cpu_time_total
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    step_seconds, peft_seconds = casts["loop"], casts["peft"]
    flops = matmul_flops_per_token(run_dir)["total"]
    dtype = training_dtype()
    peak = matmul_peak(1, dtype)
    at_peak_seconds = tokens * flops / 1e9 / peak  # the step, every FLOP at the matmul peak
    fraction = at_peak_seconds / step_seconds
    shares = {k: round(v / total, 3) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    attention = attention_seconds(lengths, model.lm.config, dtype, repeats=steps)
    fastest_attention = min(attention.values())
    matmul_seconds = by_kind["matmul"] / total * step_seconds
    report = {
        "benchmark": "student_step",
        "batch_size": batch_size,
        "threads": 1,
        "dtype": dtype,
        "tokens_per_step": tokens,
        "step_seconds": round(step_seconds, 3),
        "tokens_per_s": round(tokens / step_seconds, 1),
        "step_seconds_peft_casts": round(peft_seconds, 3),
        "speedup_over_peft_casts": round(peft_seconds / step_seconds, 3),
        "matmul_peak_gflops": peak,
        "flops_per_token": round(flops),
        "roofline_fraction": round(fraction, 3),
        "step_seconds_eager_layers": round(fused["eager"], 3),
        "step_seconds_compiled": round(fused["compiled"], 3),
        "speedup_compiled": round(fused["eager"] / fused["compiled"], 3),
        "roofline_fraction_compiled": round(at_peak_seconds / fused["compiled"], 3),
        "compile_seconds": round(compile_seconds, 1),
        "share_by_kind": shares,
        "matmul_only_fraction": round(fraction / shares["matmul"], 3),
        "matmul_seconds": round(matmul_seconds, 3),
        "attention_seconds_by_kernel": attention,
        "roofline_ceiling": round(at_peak_seconds / (matmul_seconds + fastest_attention), 3),
        "roofline_ceiling_matmuls_at_peak": round(
            at_peak_seconds / (at_peak_seconds + fastest_attention), 3
        ),
        "top_ops": [
            {"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
            for e in top
        ],
        **provenance(started),
    }
    report["machine"] |= cpu_and_precision()
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    keys = ("step_seconds", "roofline_fraction", "speedup_compiled", "roofline_ceiling")
    print(json.dumps({k: report[k] for k in keys}))


if __name__ == "__main__":
    typer.run(main)
