"""Training does what it claims: the loss falls, the export holds the trained weights,
and a resumed run ends where an uninterrupted one does, weight for weight."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from radiag.cohort.schema import Label
from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.students.distill import (
    export_final,
    load_final,
    training_examples,
    training_sequences,
)
from radiag.students.formatting import encode_target, targets
from radiag.students.modeling import StudentWeightsError, trainable_state
from radiag.students.training import TRAINABLE_FILE, build_student, train_loop, training_loss

ROWS = [
    {"description": f"A {age}-year-old patient. MMSE {mmse}.", "rationale": "", "label": label}
    for age, mmse, label in [(71, 29, Label.CN), (78, 20, Label.AD), (74, 25, Label.MCI)]
]


def encoded(cfg: DistillConfig, model_dir: Path) -> list[dict]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [encode_target(tokenizer, t, 512) for row in ROWS for t in targets(row, cfg.loss)]


def step_loss(model: torch.nn.Module, batch: list[dict], cfg: DistillConfig) -> torch.Tensor:
    labels = [row["labels"] for row in batch]
    nll = model([row["input_ids"] for row in batch], labels)
    masks = [row["answer_mask"] for row in batch]
    return training_loss(nll, labels, masks, [row["kind"] for row in batch], cfg)[0]


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


def fit(cfg: DistillConfig, store: RunStore, storage: Path):
    """`train_loop` under Ray Train, as `radiag distill` runs it (one worker, gloo)."""
    model_dir = Path(cfg.model.path or "")
    examples = training_examples("text", cfg, store)
    sequences, _ = training_sequences(examples.table, cfg, AutoTokenizer.from_pretrained(model_dir))
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop,
        train_loop_config={
            "distill": cfg.model_dump(mode="json"),
            "kind": "text",
            "store_uri": store.uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=1, resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}
        ),
        datasets={"train": ray.data.from_items(sequences)},
        run_config=ray.train.RunConfig(
            name="train",
            storage_path=str(storage),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=4),
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    ).fit()


def weights_and_state(checkpoint) -> tuple[dict[str, torch.Tensor], dict]:
    with checkpoint.as_directory() as directory:
        weights = torch.load(Path(directory) / TRAINABLE_FILE)
        state = json.loads((Path(directory) / "state.json").read_text())
    return weights, state


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
    fresh_run: RunStore, tiny_student: Callable[..., DistillConfig], tmp_path: Path
) -> None:
    """A run stopped at its step-2 checkpoint and restarted in the same run directory
    (as after a kill) must restore the optimizer, the dropout RNG and the data position;
    any one left out changes the step-4 weights."""
    cfg = tiny_student(
        loss="step_by_step", optim={"max_steps": 4, "batch_size": 2}, lora={"dropout": 0.3}
    )
    straight = fit(cfg, fresh_run, tmp_path / "straight")
    fit(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"max_steps": 2})}),
        fresh_run, tmp_path / "resumed")  # fmt: skip
    resumed = fit(cfg, fresh_run, tmp_path / "resumed")

    expected, _ = weights_and_state(straight.checkpoint)
    weights, state = weights_and_state(resumed.checkpoint)
    assert state["step"] == 4 and state["resumed_at"] == [2]
    assert weights.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(weights[name], expected[name])]
    assert not different, different[:5]
    assert any("lora_B" in name and weights[name].any() for name in weights)  # LoRA B starts at 0
