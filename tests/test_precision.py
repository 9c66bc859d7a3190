"""Precision chosen by the hardware: one rule (radiag.precision), taken by every model load."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from radiag import precision
from radiag.precision import Device, explain, resolve_dtype
from radiag.serving.config import TeacherServeConfig
from radiag.serving.teacher import teacher_llm_config
from radiag.students.config import DistillConfig, StudentDiagnoseConfig
from radiag.teacher.engines import VllmEngineConfig, with_resolved_dtype
from radiag.teacher.stages import DiagnoseConfig
from radiag.teacher.vllm_engine import engine_args

ZEN3 = Device("cpu", "AMD EPYC 7B13", frozenset({"avx", "avx2", "fma", "sse4_2"}))
ZEN4 = Device("cpu", "AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}))
SAPPHIRE_RAPIDS = Device("cpu", "Xeon 8481C", frozenset({"avx512f", "amx_bf16", "amx_tile"}))
GRAVITON3 = Device("cpu", "Neoverse-V1", frozenset({"fp", "asimd", "bf16", "sve"}))
GRAVITON2 = Device("cpu", "Neoverse-N1", frozenset({"fp", "asimd"}))
A100 = Device("cuda", "A100", cuda_capability=(8, 0))
H100 = Device("cuda", "H100", cuda_capability=(9, 0))
V100 = Device("cuda", "V100", cuda_capability=(7, 0))
T4 = Device("cuda", "T4", cuda_capability=(7, 5))


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (ZEN3, "float32"),
        (GRAVITON2, "float32"),
        (ZEN4, "bfloat16"),
        (SAPPHIRE_RAPIDS, "bfloat16"),
        (GRAVITON3, "bfloat16"),
        (A100, "bfloat16"),
        (H100, "bfloat16"),
        (V100, "float16"),
        (T4, "float16"),
    ],
)
def test_auto_is_bf16_only_where_the_hardware_computes_it_natively(
    device: Device, expected: str
) -> None:
    assert resolve_dtype("auto", device) == expected


@pytest.mark.parametrize("explicit", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("device", [ZEN3, ZEN4, V100, A100])
def test_an_explicit_precision_always_wins(explicit: str, device: Device) -> None:
    assert resolve_dtype(explicit, device) == explicit  # type: ignore[arg-type]


def test_the_console_line_names_the_cpu_its_bf16_support_and_the_precision() -> None:
    assert explain(ZEN3, "float32") == "CPU AMD EPYC 7B13 without native bf16 (AVX2): float32"
    assert explain(ZEN4, "bfloat16") == (
        "CPU AMD EPYC 9B14 with native bf16 (avx512_bf16): bfloat16"
    )
    assert explain(T4, "float16") == "GPU T4 (compute capability 7.5, no native bf16): float16"


@pytest.fixture
def avx2_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process sees a CPU without native bf16 (and no GPU)."""
    monkeypatch.setattr(precision, "this_cpu", lambda: ZEN3)


def test_every_stage_config_resolves_auto_to_fp32_on_a_cpu_without_bf16(
    avx2_machine: None,
) -> None:
    assert with_resolved_dtype(VllmEngineConfig()).dtype == "float32"
    assert DistillConfig().resolved().precision == "fp32"
    assert DistillConfig().resolved().export_dtype == "float32"
    assert StudentDiagnoseConfig().resolved().dtype == "float32"


def test_an_explicit_engine_dtype_is_kept_on_any_machine(avx2_machine: None) -> None:
    assert with_resolved_dtype(VllmEngineConfig(dtype="bfloat16")).dtype == "bfloat16"
    assert DistillConfig(precision="bf16-mixed").resolved().precision == "bf16-mixed"


def test_batch_judge_and_served_teacher_get_one_set_of_engine_arguments(
    avx2_machine: None, tiny_model: Path
) -> None:
    engine = VllmEngineConfig(model={"path": str(tiny_model)}, max_model_len=1024)
    batch = engine_args(engine)
    served = teacher_llm_config(TeacherServeConfig(), DiagnoseConfig(engine=engine))
    assert batch["dtype"] == "float32" and batch["enforce_eager"] is True
    assert served.engine_kwargs == {k: v for k, v in batch.items() if k != "model"}
    assert served.model_loading_config.model_source == batch["model"]
    assert served.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_the_served_teacher_replaces_only_the_fields_it_sets(tiny_model: Path) -> None:
    run = VllmEngineConfig(model={"path": str(tiny_model)}, max_model_len=1024, dtype="float32")
    served = TeacherServeConfig(max_model_len=512).engine(run)
    assert (served.max_model_len, served.dtype, served.model) == (512, "float32", run.model)


PACKAGE = Path(__file__).parents[1] / "radiag"


def test_no_model_load_in_the_package_hard_codes_bfloat16() -> None:
    """Every load takes the resolved precision: bf16 is named only by the rule itself, by
    the students' mapping of bf16-mixed onto it, and by bf16-mixed training's autocast."""
    allowed = {
        ("precision.py", "'bfloat16'"),
        ("students/config.py", "'bfloat16'"),
        ("students/training.py", "torch.bfloat16"),
    }
    found = set()
    for path in PACKAGE.rglob("*.py"):
        where = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "bfloat16":
                found.add((where, "torch.bfloat16"))
            if isinstance(node, ast.Constant) and node.value == "bfloat16":
                found.add((where, "'bfloat16'"))
    assert found <= allowed, found - allowed
