"""The numeric precision every model runs in: one rule, chosen by the hardware.

bf16 is the fast format only where the hardware computes it natively: CUDA GPUs of compute
capability 8.0 and up, x86 CPUs with AVX-512 BF16 or AMX, ARM CPUs with the `bf16`
extension. Elsewhere it is emulated, and a CPU without native bf16 runs bf16 matmuls about
55x slower than fp32 (AVX2 only: oneDNN falls back to a plain loop). So `dtype: auto`, the
default of every model load (teacher and judge engines, the served teacher, student
training, export and inference, the bundled model's conversion), resolves to:

- bfloat16 on CUDA GPUs with compute capability >= 8.0, float16 on older CUDA GPUs;
- bfloat16 on a CPU with native bf16, float32 on any other CPU.

An explicit value always wins. Stages resolve `auto` before they compute their identity,
so the resolved value is part of it: a run continued on a machine that resolves another
precision is refused, naming the field, instead of mixing rows of two precisions.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
ResolvedDtype = Literal["bfloat16", "float16", "float32"]

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""CPU flags (as /proc/cpuinfo lists them) that mean native bf16: x86 AVX-512 BF16 and AMX,
ARM's `bf16` (FEAT_BF16)."""
BF16_GPU_CAPABILITY = (8, 0)  # Ampere and later


@dataclass(frozen=True)
class Device:
    """What the rule needs to know about the hardware a model runs on."""

    kind: Literal["cpu", "cuda"]
    name: str = ""
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    cuda_capability: tuple[int, int] | None = None

    @property
    def native_bf16(self) -> bool:
        if self.kind == "cuda":
            return (self.cuda_capability or (0, 0)) >= BF16_GPU_CAPABILITY
        return bool(self.cpu_flags & NATIVE_BF16_FLAGS)


def resolve_dtype(requested: Dtype, device: Device) -> ResolvedDtype:
    """The precision a model runs in on `device`: an explicit value as given, `auto` by the
    hardware (see the module docstring)."""
    if requested != "auto":
        return requested
    if device.native_bf16:
        return "bfloat16"
    return "float16" if device.kind == "cuda" else "float32"


def explain(device: Device, resolved: ResolvedDtype) -> str:
    """One line for the console: the hardware, why, and the precision it gets."""
    if device.kind == "cuda":
        major, minor = device.cuda_capability or (0, 0)
        support = "native bf16" if device.native_bf16 else "no native bf16"
        return f"GPU {device.name} (compute capability {major}.{minor}, {support}): {resolved}"
    native = sorted(device.cpu_flags & NATIVE_BF16_FLAGS)
    if native:
        return f"CPU {device.name} with native bf16 ({', '.join(native)}): {resolved}"
    vector = next(
        (f.upper() for f in ("avx512f", "avx2", "avx", "neon") if f in device.cpu_flags), ""
    )
    return f"CPU {device.name} without native bf16{f' ({vector})' if vector else ''}: {resolved}"


@functools.cache
def this_cpu() -> Device:
    """This machine's CPU, from /proc/cpuinfo (Linux); other systems count as no native bf16."""
    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in {"flags", "features"} and not flags:
                flags = set(value.split())
            elif key == "model name" and name in {"", platform.machine()}:
                name = value.strip()
    return Device(kind="cpu", name=name, cpu_flags=frozenset(flags))


def local_gpu() -> Device | None:
    """The first CUDA GPU this process sees, or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    return Device(
        kind="cuda",
        name=torch.cuda.get_device_name(0),
        cuda_capability=torch.cuda.get_device_capability(0),
    )


GPU_PROBE_TIMEOUT_S = 600.0  # an autoscaler may take minutes to start a GPU node


def gpu_device() -> Device:
    """The GPU a stage's workers get: this process's own, or (a driver on a cluster's head
    node, which has none) the one a one-GPU Ray task sees on a worker node.

    Raises:
        RuntimeError: no GPU answered in time; the message says to set the dtype.
    """
    local = local_gpu()
    if local is not None:
        return local
    import ray

    probe = ray.remote(num_gpus=1)(local_gpu).remote()
    ready, _ = ray.wait([probe], timeout=GPU_PROBE_TIMEOUT_S)
    found = ray.get(ready[0]) if ready else None
    if found is None:
        ray.cancel(probe, force=True)
        raise RuntimeError(
            f"dtype auto of a GPU engine: no Ray worker with a GPU answered within "
            f"{GPU_PROBE_TIMEOUT_S:.0f} s; set the dtype (bfloat16, float16) explicitly"
        )
    return found


def resolve_for(requested: Dtype, on_gpu: bool) -> ResolvedDtype:
    """`resolve_dtype` for where a stage's model runs: its GPUs, or this machine's CPU
    (a CPU worker of a cluster has the head's kind of CPU; give `dtype` where it does not)."""
    if requested != "auto":
        return requested
    return resolve_dtype(requested, gpu_device() if on_gpu else this_cpu())


def torch_dtype(name: ResolvedDtype):  # -> torch.dtype
    """The torch dtype of a resolved precision name."""
    import torch

    return getattr(torch, name)


def this_machine() -> tuple[Device, ResolvedDtype]:
    """This process's device (its first GPU, else its CPU) and what `auto` resolves to there:
    what the console says at start and the manifest records."""
    device = local_gpu() or this_cpu()
    return device, resolve_dtype("auto", device)
