"""Benchmark: the students' torch-level paths on one CUDA GPU, as a GPU worker runs them.

The development machines have no GPU, and the GPU machine this was measured on has torch,
transformers and peft but no Ray, vLLM or DeepSpeed. So this drives the code a Ray Train
worker runs (`radiag.students.modeling`, `radiag.precision`) directly, in one process:
  precision   what `dtype: auto` resolves to on this GPU, and the line the console prints;
  agreement   one batch's per-token loss under bf16 autocast on the GPU against fp32 on the
              CPU, same weights and batch (the GPU path computes the same model);
  text        LoRA training steps of the text student (the bundled SmolLM2-135M's
              architecture with random weights: a step costs the same whatever the weights)
              at several batch sizes, in bf16 autocast (`auto` here) and fp32 (what `auto`
              gives a GPU below compute capability 8.0): tokens/s, and its share of the bf16
              matmul peak measured in the same run (~4 x the non-embedding parameters in
              FLOPs per token, as benchmarks/students.py counts them);
  vlm         the MRI+text student's training step (DenseNet-small on 96^3 volumes, an
              8-token prefix, the LoRA LM): samples/s.
Throughput is the median of timed steps after warm-up steps. Writes
benchmarks/results/students_gpu.json.

    python benchmarks/gpu_students.py --model-config DIR --commit SHA   # DIR: config.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from provenance import provenance, run_start
from students import lora_flops_per_token
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from radiag.precision import explain, local_gpu, resolve_dtype
from radiag.students.modeling import MriPrefix, StudentModel, build_encoder

RESULTS = Path(__file__).parent / "results" / "students_gpu.json"
LORA = {  # radiag.students.config.LoraSettings' defaults
    "r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
SEQUENCE = 768  # DistillConfig.max_length: every row at the longest a student trains on
SPATIAL = (96, 96, 96)  # VolumeConfig.spatial_size
PAD = 2


def student(config: PretrainedConfig, mri: bool, device: str) -> StudentModel:
    """A fresh LoRA student (fp32 weights, as `build_student` makes it) on `device`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", **LORA))
    prefix = None
    if mri:
        encoder = build_encoder("densenet_small", 256, SPATIAL)
        prefix = MriPrefix(encoder, 256, config.hidden_size, prefix_tokens=8)
    return StudentModel(lm, prefix, PAD).to(device)


def batch(config: PretrainedConfig, rows: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, config.vocab_size, (rows, SEQUENCE), generator=generator).tolist()


def step_seconds(
    model: StudentModel, ids: list[list[int]], volumes: torch.Tensor | None, bf16: bool,
    warmup: int, steps: int,
) -> float:  # fmt: skip
    """Median seconds of one optimizer step (forward, backward, clip, AdamW), as
    `train_loop` takes it: autocast around the forward, the token-mean loss outside."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            nll = model(ids, ids, volumes)
        loss = nll.sum() / nll.count_nonzero().clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {float(loss)} at step {index}")
    return statistics.median(times)


def bf16_matmul_peak_tflops() -> float:
    """Best of ten 8192^3 bf16 matmuls after three warm-ups (the chip's dense ceiling)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = 0.0
    for index in range(13):
        torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        torch.cuda.synchronize()
        if index >= 3:
            best = max(best, 2 * 8192**3 / (time.perf_counter() - start) / 1e12)
    return round(best, 1)


def agreement(config: PretrainedConfig) -> dict[str, float]:
    """Per-token loss of one batch: GPU bf16 autocast vs CPU fp32, same weights and rows."""
    model = student(config, mri=False, device="cpu").eval()
    ids = batch(config, rows=2, seed=1)
    with torch.no_grad():
        cpu = model(ids, ids).double()
        model.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu = model(ids, ids).double().cpu()
    labelled = cpu != 0
    relative = ((gpu - cpu).abs()[labelled] / cpu[labelled]).median()
    return {
        "mean_loss_cpu_fp32": round(float(cpu[labelled].mean()), 4),
        "mean_loss_gpu_bf16": round(float(gpu[labelled].mean()), 4),
        "median_relative_token_difference": round(float(relative), 4),
    }


def main(
    model_config: Annotated[Path, typer.Option(help="a directory with the LM's config.json")],
    commit: Annotated[str, typer.Option(help="the commit measured (.git does not travel)")],
    warmup: int = 3,
    steps: int = 10,
) -> None:
    started = run_start()
    device = local_gpu()
    if device is None:
        raise SystemExit("no CUDA GPU: this benchmark measures the GPU path")
    config = AutoConfig.from_pretrained(model_config)
    peak = bf16_matmul_peak_tflops()
    flops = lora_flops_per_token(config)
    text: dict[str, Any] = {}
    for precision, rows in (("bf16", 4), ("bf16", 16), ("bf16", 64), ("fp32", 16)):
        model = student(config, mri=False, device="cuda")
        seconds = step_seconds(model, batch(config, rows), None, precision == "bf16", warmup, steps)
        tokens_per_s = rows * SEQUENCE / seconds
        text[f"{precision}_batch{rows}"] = {
            "step_seconds": round(seconds, 4),
            "tokens_per_s": round(tokens_per_s),
            "bf16_peak_fraction": round(tokens_per_s * flops / 1e12 / peak, 4),
        }
        del model
    vlm: dict[str, Any] = {}
    for rows in (4, 16):
        model = student(config, mri=True, device="cuda")
        volumes = torch.randn(rows, 1, *SPATIAL, generator=torch.Generator().manual_seed(0))
        seconds = step_seconds(model, batch(config, rows), volumes, True, warmup, steps)
        vlm[f"bf16_batch{rows}"] = {
            "step_seconds": round(seconds, 4),
            "samples_per_s": round(rows / seconds, 1),
        }
        del model
    report = {
        "gpu": device.name,
        "cuda_capability": list(device.cuda_capability or ()),
        "auto_dtype": resolve_dtype("auto", device),
        "console": explain(device, resolve_dtype("auto", device)),
        "torch": torch.__version__,
        "sequence_tokens": SEQUENCE,
        "bf16_matmul_peak_tflops": peak,
        "lora_flops_per_token": flops,
        "agreement": agreement(config),
        "text": text,
        "vlm": vlm,
    }
    report |= provenance(started) | {"git_commit": commit}
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    typer.run(main)
