"""Training does what it claims: the loss falls and the export holds the trained weights.
(A killed run that resumes ends where an uninterrupted one does, weight for weight:
test_distill_resume.py.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from radiag.cohort.schema import Label
from radiag.students.config import DistillConfig
from radiag.students.distill import (
    export_final,
    load_final,
)
from radiag.students.formatting import encode_target, targets
from radiag.students.modeling import StudentWeightsError, trainable_state
from radiag.students.training import (
    TRAINABLE_FILE,
    build_student,
    lora_input_casts,
    training_loss,
)

ROWS = [
    {"description": f"A {age}-year-old patient. MMSE {mmse}.", "rationale": "", "label": label}
    for age, mmse, label in [(71, 29, Label.CN), (78, 20, Label.AD), (74, 25, Label.MCI)]
]


def encoded(cfg: DistillConfig, model_dir: Path) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [encode_target(tokenizer, t, 512) for row in ROWS for t in targets(row, cfg.loss)]


def step_loss(
    model: torch.nn.Module,
    batch: list[dict],
    cfg: DistillConfig,
    weights: list[float] | None = None,
) -> torch.Tensor:
    labels = [row["labels"] for row in batch]
    nll = model([row["input_ids"] for row in batch], labels)
    masks = [row["answer_mask"] for row in batch]
    return training_loss(nll, labels, masks, [row["kind"] for row in batch], cfg, weights)[0]


def test_the_loss_falls_when_the_student_memorises_a_few_patients(
    tiny_student: Callable[..., DistillConfig],
) -> None:
    cfg = tiny_student(loss="label", finetune="full")
    model_dir = Path(cfg.model.path or "")
    torch.manual_seed(0)
    model = build_student("text", cfg, model_dir).train()
    batch = encoded(cfg, model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = step_loss(model, batch, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("loss", ["rationale_label", "step_by_step"])
def test_a_row_weighed_twice_counts_as_if_it_were_in_the_batch_twice(
    tiny_student: Callable[..., DistillConfig], loss: str
) -> None:
    """`balance_classes` weighs rows; a weight of 2 is the row seen twice, in the text
    loss and in the answer loss alike."""
    cfg = tiny_student(loss=loss)
    model_dir = Path(cfg.model.path or "")
    model = build_student("text", cfg, model_dir).eval()
    rows = [{**row, "rationale": f"Rationale {i}."} for i, row in enumerate(ROWS)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    first, *rest = [[encode_target(tokenizer, t, 512) for t in targets(r, cfg.loss)] for r in rows]
    others = [seq for sequences in rest for seq in sequences]
    with torch.no_grad():
        weighted = step_loss(model, first + others, cfg, [2.0] * len(first) + [1.0] * len(others))
        repeated = step_loss(model, first + first + others, cfg)
        plain = step_loss(model, first + others, cfg)
    assert float(weighted) == pytest.approx(float(repeated), rel=1e-5)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-5)


def test_the_answer_loss_is_the_options_summed_negative_log_likelihood(
    tiny_student: Callable[..., DistillConfig],
) -> None:
    """What inference compares across the options is what training lowers."""
    cfg = tiny_student(loss="label")
    model_dir = Path(cfg.model.path or "")
    model = build_student("text", cfg, model_dir).eval()
    (row,) = encoded(cfg, model_dir)[:1]
    with torch.no_grad():
        nll = model([row["input_ids"]], [row["labels"]])
        _, parts = training_loss(nll, [row["labels"]], [row["answer_mask"]], ["label"], cfg)
    answer = torch.tensor(row["answer_mask"], dtype=torch.bool)
    assert parts["loss_answer"] == pytest.approx(float(nll[0, answer].sum()), rel=1e-5)


def export(cfg: DistillConfig, state: dict[str, torch.Tensor], root: Path) -> Path:
    checkpoint, out = root / "checkpoint", root / "final"
    checkpoint.mkdir()
    out.mkdir()
    torch.save(state, checkpoint / TRAINABLE_FILE)
    export_final("text", cfg, checkpoint, out, {"kind": "text", "config": cfg.model_dump()})
    return out


def test_the_export_holds_the_trained_weights_not_the_base_models(
    tiny_student: Callable[..., DistillConfig], tmp_path: Path
) -> None:
    cfg = tiny_student(loss="label")
    model_dir = Path(cfg.model.path or "")
    model = build_student("text", cfg, model_dir)
    torch.manual_seed(1)
    trained = {name: torch.randn_like(v) for name, v in trainable_state(model).items()}

    out = export(cfg, trained, tmp_path)

    base = load_file(model_dir / "model.safetensors")
    exported = load_file(out / "lm" / "model.safetensors")
    changed = [name for name in base if not torch.equal(base[name], exported[name])]
    assert any("q_proj" in name for name in changed) and any(
        "down_proj" in name for name in changed
    )
    student, info = load_final(out, "float32")
    assert info["kind"] == "text" and student.lm.training is False


def test_an_export_refuses_a_checkpoint_that_lacks_a_trained_weight(
    tiny_student: Callable[..., DistillConfig], tmp_path: Path
) -> None:
    cfg = tiny_student(loss="label")
    state = trainable_state(build_student("text", cfg, Path(cfg.model.path or "")))
    lost = sorted(state)[0]
    del state[lost]
    with pytest.raises(StudentWeightsError, match=lost):
        export(cfg, state, tmp_path)


def test_under_bf16_mixed_a_lora_students_base_is_bf16_and_what_trains_is_fp32(
    tiny_student: Callable[..., DistillConfig],
) -> None:
    # The frozen weights are only read: in bf16 autocast does not cast them at every pass.
    cfg = tiny_student(loss="label", precision="bf16-mixed")
    model = build_student("text", cfg, Path(cfg.model.path or ""))
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = step_loss(model, encoded(cfg, Path(cfg.model.path or "")), cfg)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trained)

    full = build_student("text", tiny_student(finetune="full", precision="bf16-mixed"),
                         Path(cfg.model.path or ""))  # fmt: skip
    assert {p.dtype for p in full.parameters()} == {torch.float32}  # fp32 master weights


def test_under_bf16_mixed_lora_reads_its_input_in_bf16_with_the_loss_unchanged(
    tiny_student: Callable[..., DistillConfig],
) -> None:
    # PEFT would cast each adapter's input to fp32 for autocast to cast it back: two copies
    # of an activation per projection for the same bf16 matmul.
    from peft.tuners.lora import Linear as LoraLinear

    cfg = tiny_student(loss="label", precision="bf16-mixed")
    model = build_student("text", cfg, Path(cfg.model.path or ""))
    batch = encoded(cfg, Path(cfg.model.path or ""))
    adapted = [m for m in model.modules() if isinstance(m, LoraLinear)]
    seen: list[torch.dtype] = []
    for layer in adapted:
        layer.lora_A["default"].register_forward_pre_hook(
            lambda _, args: seen.append(args[0].dtype)
        )

    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = step_loss(model, batch, cfg)
    lora_input_casts(model, enabled=True)  # PEFT's default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = step_loss(model, batch, cfg)

    half = len(seen) // 2
    assert len(seen) == 2 * len(adapted) > 0
    assert set(seen[:half]) == {torch.bfloat16} and set(seen[half:]) == {torch.float32}
    assert torch.equal(kept, cast)


def test_a_fresh_mri_prefix_starts_as_long_as_the_lms_own_token_embeddings(
    tiny_student: Callable[..., DistillConfig],
) -> None:
    # Longer prefix tokens would drown the text until training shrinks them.
    cfg = tiny_student(
        loss="rationale_label", mri={"volumes": {"pixdim_mm": 4.0, "spatial_size": [32, 32, 32]}}
    )
    torch.manual_seed(0)
    model = build_student("vlm", cfg, Path(cfg.model.path or ""))
    tokens = model.lm.get_input_embeddings().weight.detach().norm(dim=1).mean()
    assert model.mri is not None
    with torch.no_grad():
        prefix = model.mri(torch.randn(4, 1, *cfg.mri.volumes.spatial_size))
    assert prefix.norm(dim=-1).mean() == pytest.approx(tokens.item(), rel=0.2)
