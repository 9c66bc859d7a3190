"""The Ray Train loop that every worker runs, and what it builds.

`TorchTrainer` places the workers and forms the process group (gloo on CPU,
NCCL on GPU); the loop only builds the model, wraps it for the configured
strategy and trains on its shard of the `train` dataset. Every worker reports
the same number of times; checkpoints go through `ray.train.report` to the run
store, and a restarted run continues from `ray.train.get_checkpoint()`.

A checkpoint restores everything that decides the next step, so a resumed run
ends with the same weights as an uninterrupted one: the trainable weights (loaded
strictly), the optimizer state, every rank's torch RNG (LoRA dropout) and the data
position (`Progress`: epoch and batches already trained; the sequences' order is
fixed by the seed before training starts).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from radiag.models import prepare_model
from radiag.store import RunStore
from radiag.students.config import DistillConfig, MriSettings, StudentKind
from radiag.students.formatting import IGNORE
from radiag.students.modeling import (
    MriPrefix,
    StudentModel,
    build_encoder,
    load_trainable,
    trainable_state,
)
from radiag.students.volumes import load_volume

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.pt"  # the weights that train (all, or LoRA + MRI side)
STATE_FILE = "state.json"  # epoch / step counters
OPTIMIZER_FILE = "optimizer.pt"


def _rng_file(rank: int) -> str:
    """Each rank's RNG state: dropout draws differ per rank."""
    return f"rng-{rank}.pt"


def build_student(kind: StudentKind, cfg: DistillConfig, model_dir: Path) -> StudentModel:
    """The untrained student: base LM (+ LoRA) and, for `vlm`, a fresh MRI encoder.

    Under bf16 mixed precision the frozen base weights of a LoRA or frozen student are kept
    in bf16: they are only read, and in fp32 autocast would cast each of them again at
    every forward and backward pass. Weights that train (LoRA, PEFT keeps them fp32; the
    MRI side; a full fine-tune) stay fp32.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    frozen_base = cfg.finetune != "full" and cfg.precision == "bf16-mixed"
    lm = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if frozen_base else torch.float32
    )
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        lm = get_peft_model(
            lm,
            LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=lora.target_modules, task_type="CAUSAL_LM",
            ),
        )  # fmt: skip
        if frozen_base:
            lora_input_casts(lm, enabled=False)
    elif cfg.finetune == "frozen":
        lm.requires_grad_(False)
    mri = build_mri_prefix(cfg.mri, lm) if kind == "vlm" else None
    return StudentModel(lm, mri, pad_id(tokenizer))


def lora_input_casts(model: torch.nn.Module, enabled: bool) -> None:
    """Switch PEFT's cast of each LoRA layer's input to the adapter's dtype on or off.

    Under bf16 autocast the cast is off: PEFT would cast the input to the fp32 adapter and
    autocast cast it back to bf16 for the matmul, two copies of an activation per adapted
    projection and their gradients. Without them a CPU step is 1.08x as fast
    (`benchmarks/student_step.py`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def build_mri_prefix(settings: MriSettings, lm: PreTrainedModel) -> MriPrefix:
    """A fresh MRI encoder + projector sized for `lm`'s embeddings and scaled to them."""
    encoder = build_encoder(settings.encoder, settings.feature_dim, settings.volumes.spatial_size)
    embeddings = lm.get_input_embeddings().weight.detach().float()
    token_norm = embeddings.norm(dim=1).mean().item()
    return MriPrefix(
        encoder, settings.feature_dim, embeddings.shape[1], settings.prefix_tokens, token_norm
    )


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class Strategy(Protocol):
    """How the model is wrapped, stepped and checkpointed: DDP or DeepSpeed."""

    module: StudentModel

    def backward_and_step(self, loss: torch.Tensor) -> None: ...
    def save(self, directory: Path) -> None: ...
    def load(self, directory: Path) -> None: ...


class DdpStrategy:
    """torch DDP via `ray.train.torch.prepare_model`; rank 0 writes the checkpoint."""

    def __init__(self, model: StudentModel, cfg: DistillConfig) -> None:
        import ray.train.torch

        self.module = model
        self.wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        self.params, self.optimizer = student_optimizer(model, cfg)
        self.clip = cfg.optim.grad_clip

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()

    def save(self, directory: Path) -> None:
        if _rank() == 0:
            torch.save(trainable_state(self.module), directory / TRAINABLE_FILE)
            torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        load_trainable(self.module, torch.load(directory / TRAINABLE_FILE))
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE))


class DeepSpeedStrategy:
    """DeepSpeed ZeRO (`deepspeed.initialize` inside the loop). Every rank writes its
    optimizer shard; Ray merges the workers' files into one checkpoint directory."""

    TAG = "deepspeed"

    def __init__(self, model: StudentModel, cfg: DistillConfig) -> None:
        import deepspeed

        self.module = model
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.optim.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": cfg.scaling.zero_stage},
            "bf16": {"enabled": cfg.scaling.use_gpu and cfg.precision == "bf16-mixed"},
        }
        _, optimizer = student_optimizer(model, cfg)
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.wrapped = self.engine

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=self.TAG)
        state = self._gathered_trainable()
        if _rank() == 0:
            torch.save(state, directory / TRAINABLE_FILE)

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory), tag=self.TAG)

    def _gathered_trainable(self) -> dict[str, torch.Tensor]:
        """Full trainable weights on every rank (ZeRO-3 partitions them; all ranks gather)."""
        import deepspeed

        params = [p for p in self.module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
            return trainable_state(self.module)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _batch_volumes(store: RunStore, paths: list[str] | None) -> torch.Tensor | None:
    if paths is None:
        return None
    return torch.from_numpy(np.stack([load_volume(store, p) for p in paths]))  # (B, 1, D, H, W)


def _padded(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    """Ragged rows as one (B, width) tensor, cut or filled with `fill` on the right."""
    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : min(len(row), width)] = torch.tensor(row[:width], dtype=torch.long)
    return out


def training_loss(
    nll: torch.Tensor,
    labels: list[list[int]],
    answer_mask: list[list[int]],
    kinds: list[str],
    cfg: DistillConfig,
    weights: list[float] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss: token-mean text loss per task kind (label + w x rationale for
    step-by-step), plus the answer loss: the answer option's summed negative
    log-likelihood, averaged over the rows that have one. `weights` (one per row, default
    1) weigh each row in both means, as if it were in the batch that many times.

    The answer term is the one that teaches the diagnosis: in a token mean its letter
    would be one of ~11 final-line tokens (or of hundreds after a rationale), and every
    other one of them is fixed text the model learns in a few steps.
    """
    width = nll.shape[1]
    answer = _padded(answer_mask, width, 0).bool().to(nll.device)
    text = (_padded(labels, width, IGNORE) != IGNORE).to(nll.device) & ~answer
    row_weight = torch.tensor(weights or [1.0] * len(kinds), device=nll.device)[:, None]
    parts: dict[str, torch.Tensor] = {}
    for kind in sorted(set(kinds)):
        rows = torch.tensor([k == kind for k in kinds], device=nll.device)[:, None]
        weighted = (text & rows) * row_weight
        parts[kind] = (nll * weighted).sum() / weighted.sum().clamp(min=1e-9)
    answered = answer.any(dim=1)
    if answered.any():
        per_row = (nll * answer).sum(dim=1)[answered]
        answered_weight = row_weight[answered, 0]
        parts["answer"] = (per_row * answered_weight).sum() / answered_weight.sum()
    weight = {"rationale": cfg.rationale_weight if cfg.loss == "step_by_step" else 1.0}
    loss = sum(weight.get(kind, 1.0) * value for kind, value in parts.items())
    assert isinstance(loss, torch.Tensor)
    return loss, {f"loss_{kind}": float(value.detach()) for kind, value in parts.items()}


def student_optimizer(
    model: torch.nn.Module, cfg: DistillConfig
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """The weights that train, and the AdamW that trains them."""
    params = [p for p in model.parameters() if p.requires_grad]
    return params, torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)


def training_autocast(model: torch.nn.Module, cfg: DistillConfig) -> torch.autocast:
    """The forward pass's autocast: bf16 under `bf16-mixed`, a no-op under fp32."""
    return torch.autocast(
        next(model.parameters()).device.type,
        dtype=torch.bfloat16,
        enabled=cfg.precision == "bf16-mixed",
    )


def _save_rng(directory: Path) -> None:
    torch.save(torch.get_rng_state(), directory / _rng_file(_rank()))


def _restore_rng(directory: Path) -> None:
    torch.set_rng_state(torch.load(directory / _rng_file(_rank())))


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint, so a restart continues here."""

    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already trained
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # metrics of every step
    resumed_at: list[int] = field(default_factory=list)  # steps where a restart continued


def train_loop(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs. `config` holds only validated, JSON-able configs."""
    import ray.train

    logging.basicConfig(level=logging.INFO)  # this worker's log (Ray's log directory)
    cfg = DistillConfig.model_validate(config["distill"])
    kind: StudentKind = config["kind"]
    store = RunStore(config["store_uri"])
    torch.set_num_threads(cfg.scaling.threads_per_worker)
    torch.manual_seed(cfg.seed)
    model = build_student(kind, cfg, prepare_model(cfg.model))
    strategy: DdpStrategy | DeepSpeedStrategy = (
        DeepSpeedStrategy(model, cfg)
        if cfg.scaling.strategy == "deepspeed"
        else DdpStrategy(model, cfg)
    )
    progress = Progress()
    if checkpoint := ray.train.get_checkpoint():
        with checkpoint.as_directory() as directory:
            strategy.load(Path(directory))
            _restore_rng(Path(directory))
            progress = Progress(**json.loads((Path(directory) / STATE_FILE).read_text()))
        progress.resumed_at.append(progress.step)
        log.info("resumed at step %d", progress.step)
    autocast = training_autocast(model, cfg)
    shard = ray.train.get_dataset_shard("train")
    max_steps = cfg.optim.max_steps or float("inf")
    clock = time.perf_counter()
    while progress.epoch < cfg.optim.epochs and progress.step < max_steps:
        batches = shard.iter_batches(batch_size=cfg.optim.batch_size, batch_format="numpy")
        for index, batch in enumerate(batches):
            if index < progress.batch_in_epoch:
                continue  # trained before the restart
            ids = [row.tolist() for row in batch["input_ids"]]
            volumes = (
                _batch_volumes(store, batch["volume_path"].tolist()) if kind == "vlm" else None
            )
            with autocast:
                # Through the wrapper, so DDP / DeepSpeed hooks see the forward pass.
                labels = [r.tolist() for r in batch["labels"]]
                nll = strategy.wrapped(ids, labels, volumes)
            answer_mask = [r.tolist() for r in batch["answer_mask"]]
            loss, parts = training_loss(
                nll, labels, answer_mask, batch["kind"].tolist(), cfg, batch["weight"].tolist()
            )
            strategy.backward_and_step(loss)
            seen = torch.tensor([len(ids), sum(len(r) for r in ids)], dtype=torch.float64)
            if dist.is_initialized():
                dist.all_reduce(seen)  # whole-job samples and tokens of this step
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            progress.step, progress.batch_in_epoch = progress.step + 1, index + 1
            metrics = {
                "step": progress.step, "epoch": progress.epoch, "loss": float(loss), **parts,
                "samples_per_s": float(seen[0]) / elapsed, "tokens_per_s": float(seen[1]) / elapsed,
                "step_seconds": elapsed,
            }  # fmt: skip
            progress.history.append(metrics)  # every step's metrics travel in the checkpoint
            if _rank() == 0:
                log.info("step %(step)d loss %(loss).4f %(samples_per_s).2f samples/s", metrics)
            finished = progress.step >= max_steps
            if finished or progress.step % cfg.checkpoint_every == 0:
                _report(strategy, metrics, progress)
            if finished:
                return
        progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
        _report(strategy, {"step": progress.step, "epoch": progress.epoch}, progress)


def _report(
    strategy: DdpStrategy | DeepSpeedStrategy, metrics: dict[str, float], progress: Progress
) -> None:
    """Every worker writes its part of a checkpoint and reports it, at the same steps.

    Only at checkpoints: under Ray Train 2.60 (V2) each `report` waits about 2 s for the
    controller, which per step would cost more than a small student's step itself.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        strategy.save(directory)
        _save_rng(directory)
        if _rank() == 0:
            (directory / STATE_FILE).write_text(json.dumps(asdict(progress)))
        has_files = any(directory.iterdir())
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if has_files else None
        ray.train.report(metrics, checkpoint=checkpoint)
