"""The MRI-only classifier: the MRI+text student's 3-D encoder with a linear head, no LM.

The modality question ("does the MRI add anything?") needs the image alone beside the
text student and the MRI+text student. This model is that arm: the same MONAI encoder
and the same cached, normalised volumes as the MRI+text student, trained from scratch
with a class-weighted cross-entropy on the labelled training visits that have a T1.

It answers only test visits with a T1 (its coverage says how many); a volume that cannot
be used gets an output row with the error, so nothing is silently dropped. Only the
train split's labels are read. Training runs as one Ray task (its CPUs reserved), and
the stage follows the stage contract like every other.
"""

from __future__ import annotations

import datetime
import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from torch import nn

from radiag.cohort.schema import Label
from radiag.cohort.stages import SPLITS_STAGE
from radiag.contract import Stage, StageIdentity, StageSummary, config_identity, run_stage, upstream
from radiag.errors import UserError
from radiag.outputs import PROBABILITY_COLUMNS, predictions_dir, write_part
from radiag.store import RunStore
from radiag.students.config import MriOnlyConfig
from radiag.students.modeling import build_encoder
from radiag.students.volumes import load_volume, prepare_volumes

MRI_ONLY_MODEL = "mri-only"
MRI_ONLY_STAGE = Stage("mri-only", "mri_only", also=(predictions_dir(MRI_ONLY_MODEL),))
WEIGHTS = "mri_only/model.pt"
CLASSES = tuple(Label)  # the head's output order


class MriOnlyInputError(UserError, RuntimeError):
    """Training data the MRI-only model cannot use; the message names the file."""


class MriOnlyClassifier(nn.Module):
    """Volume (B, 1, D, H, W) -> class logits (B, 3) in `CLASSES` order."""

    def __init__(self, cfg: MriOnlyConfig) -> None:
        super().__init__()
        self.encoder = build_encoder(cfg.encoder, cfg.feature_dim, cfg.volumes.spatial_size)
        self.head = nn.Linear(cfg.feature_dim, len(CLASSES))

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(volumes))


def run_mri_only(cfg: MriOnlyConfig, store: RunStore, fresh: bool = False) -> StageSummary:
    """splits/{train,test} + their T1s -> predictions/mri-only/, under the stage contract.

    Raises:
        MriOnlyInputError: no labelled training visit has a usable T1.
    """
    identity = StageIdentity(
        stage=MRI_ONLY_STAGE.name,
        config=config_identity(cfg),
        upstream=upstream(store, [SPLITS_STAGE]),
    )
    return run_stage(store, MRI_ONLY_STAGE, identity, lambda: _fit(cfg, store), fresh=fresh)


def imaged_rows(store: RunStore, split: str, columns: list[str]) -> pa.Table:
    """The `columns` of a split's visits that have a T1 (reads no other column)."""
    table = store.read_table(f"splits/{split}.parquet").select([*columns, "mri_path"])
    return table.filter(pc.is_valid(table["mri_path"]))


def _fit(cfg: MriOnlyConfig, store: RunStore) -> StageSummary:
    train = imaged_rows(store, "train", ["patient_id", "label"])
    train = train.filter(pc.is_valid(train["label"]))
    test = imaged_rows(store, "test", ["patient_id"])  # test labels stay unread
    both = pa.concat_tables([train.select(["patient_id", "mri_path"]), test])
    prepared = prepare_volumes(both, cfg.volumes, store).table
    volumes = prepared.to_pylist()  # one row per visit: a volume or an error
    volume_of = {r["patient_id"]: r["volume_path"] for r in volumes}
    error_of = {r["patient_id"]: r["error"] for r in volumes}
    examples = [
        (volume_of[r["patient_id"]], CLASSES.index(Label(r["label"])))
        for r in train.to_pylist()
        if volume_of[r["patient_id"]]
    ]
    if not examples:
        raise MriOnlyInputError(
            f"no labelled visit in {store.uri_of('splits/train.parquet')} has a usable T1"
        )
    answerable = [(pid, volume_of[pid]) for pid in test["patient_id"].to_pylist() if volume_of[pid]]
    start = time.perf_counter()
    train_task = _train_and_predict.options(num_cpus=cfg.threads)
    weights, probabilities, history = ray.get(
        train_task.remote(
            cfg.model_dump(mode="json"), store.uri, examples, [v for _, v in answerable]
        )
    )
    store.write_bytes(WEIGHTS, weights)
    seconds = time.perf_counter() - start
    rows = [
        _row(pid, dict(zip(CLASSES, p, strict=True)), seconds / max(len(answerable), 1))
        for (pid, _), p in zip(answerable, probabilities, strict=True)
    ]
    rows += [
        _row(pid, None, 0.0, error_of[pid])
        for pid in test["patient_id"].to_pylist()
        if error_of[pid]
    ]
    directory = predictions_dir(MRI_ONLY_MODEL)
    store.fs.delete_dir_contents(store.path(directory), missing_dir_ok=True)
    if rows:
        write_part(store, directory, rows)
    return StageSummary(
        stage=MRI_ONLY_STAGE.name,
        counts={
            "train_volumes": len(examples),
            "test_predicted": len(answerable),
            "unusable_volumes": sum(1 for e in error_of.values() if e),
        },
        details={"seconds": round(seconds, 1), "epochs": cfg.optim.epochs, "loss": history},
    )


def _row(
    patient_id: str,
    probabilities: dict[Label, float] | None,
    latency_s: float,
    error: str | None = None,
) -> dict[str, Any]:
    answer = (
        {}
        if probabilities is None
        else {
            "diagnosis": max(probabilities, key=probabilities.__getitem__).value,
            **{PROBABILITY_COLUMNS[label]: p for label, p in probabilities.items()},
        }
    )
    return {
        "patient_id": patient_id,
        "task": "diagnose",
        "engine": "torch",
        "model": MRI_ONLY_MODEL,
        "dtype": "float32",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "latency_s": latency_s,
        "error": error,
        "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        **answer,
    }


@ray.remote(max_retries=0)
def _train_and_predict(
    cfg_json: dict[str, Any],
    store_uri: str,
    examples: list[tuple[str, int]],
    test_volumes: list[str],
) -> tuple[bytes, list[list[float]], list[float]]:
    """Train on (volume, class) pairs; returns the weights, the test probabilities and the
    mean loss of each epoch. fp32: the encoder is small and trains where bf16 is slow too."""
    cfg = MriOnlyConfig.model_validate(cfg_json)
    store = RunStore(store_uri)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = MriOnlyClassifier(cfg)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    volumes = np.stack([load_volume(store, path) for path, _ in examples])  # (N, 1, D, H, W)
    targets = torch.tensor([c for _, c in examples])
    counts = torch.bincount(targets, minlength=len(CLASSES)).clamp(min=1).float()
    loss_fn = nn.CrossEntropyLoss(weight=len(targets) / (len(CLASSES) * counts))  # balanced
    order_rng = np.random.default_rng(cfg.seed)
    per_epoch = max(1, -(-len(targets) // cfg.optim.batch_size))
    max_steps = cfg.optim.max_steps or float("inf")
    history, steps = [], 0
    model.train()
    for _ in range(cfg.optim.epochs):
        losses = []
        for batch in np.array_split(order_rng.permutation(len(targets)), per_epoch):
            if steps >= max_steps:
                break
            loss = loss_fn(model(torch.from_numpy(volumes[batch])), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            losses.append(float(loss))
            steps += 1
        if losses:
            history.append(round(float(np.mean(losses)), 4))
    model.eval()
    probabilities: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(test_volumes), cfg.optim.batch_size):
            paths = test_volumes[start : start + cfg.optim.batch_size]
            batch = torch.from_numpy(np.stack([load_volume(store, p) for p in paths]))
            probabilities += torch.softmax(model(batch), dim=1).tolist()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue(), probabilities, history
