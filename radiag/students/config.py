"""Configs of the student stages (one class per concern, mapped one to one onto YAML), and
the stages' names and output locations: light enough for every command to import."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from radiag.config import StrictModel
from radiag.contract import Stage
from radiag.errors import UserError
from radiag.models import ModelSpec
from radiag.outputs import predictions_dir
from radiag.precision import Dtype, ResolvedDtype, resolve_for
from radiag.students.volumes import VolumeConfig

StudentKind = Literal["text", "vlm"]
LossName = Literal["label", "rationale_label", "step_by_step"]
EncoderName = Literal["densenet121", "densenet_small", "vit_small"]
FINAL_MARKER = "student.json"  # written last in an export: a final/ without it is incomplete


def stage_dir(kind: StudentKind) -> str:
    """Where a student's checkpoints and final export live in the run."""
    return f"checkpoints/{kind}"


def distill_stage(kind: StudentKind) -> Stage:
    return Stage(f"distill-{kind}", stage_dir(kind))


def model_name(kind: StudentKind) -> str:
    """The student's name among the run's models (predictions, report, Serve)."""
    return f"student-{kind}"


def student_diagnose_stage(kind: StudentKind) -> Stage:
    return Stage(f"diagnose-{model_name(kind)}", predictions_dir(model_name(kind)), resumable=True)


class LoraSettings(StrictModel):
    """PEFT LoRA on the LM's attention and MLP projections."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1, description="usually 2 x r")
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="0 by default: on a CPU the dropout masks of the seven projections' "
        "inputs cost about 14 % of a training step, and a student trains for 1-3 epochs",
    )  # fmt: skip
    target_modules: list[str] = Field(
        default_factory=lambda: [
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        ]
    )  # fmt: skip


class MriSettings(StrictModel):
    """The MRI+text student's image side (ignored by the text student)."""

    encoder: EncoderName = "densenet_small"
    feature_dim: int = Field(256, ge=8)
    prefix_tokens: int = Field(8, ge=1, description="LM embeddings the volume becomes")
    volumes: VolumeConfig = Field(default_factory=VolumeConfig)


class OptimSettings(StrictModel):
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after N optimizer steps")
    batch_size: int = Field(4, ge=1, description="sequences per worker per step")
    grad_clip: float = Field(1.0, gt=0)


class ScalingSettings(StrictModel):
    """Ray Train placement and the distributed strategy."""

    workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    threads_per_worker: int = Field(
        1, ge=1, description="torch threads per worker (CPU); workers x threads <= cores"
    )
    strategy: Literal["ddp", "deepspeed"] = Field(
        "ddp", description="torch DDP, or DeepSpeed ZeRO (gloo + DS_ACCELERATOR=cpu on CPU)"
    )
    zero_stage: Literal[0, 1, 2, 3] = 2


class DistillConfig(StrictModel):
    """Module II-2: one student distilled from the teacher's rationales (Ray Train)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    """The LM to fine-tune; default the bundled SmolLM2-135M-Instruct."""
    finetune: Literal["full", "lora", "frozen"] = Field(
        "lora", description="frozen: only the MRI encoder and projector train (vlm)"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    loss: LossName = "step_by_step"
    rationale_weight: float = Field(
        1.0, ge=0, description="step_by_step: weight of the rationale loss"
    )
    include_flagged: bool = Field(
        False, description="also train on rationales the teacher's QC flagged"
    )
    balance_classes: bool = Field(
        False,
        description="weight each training row by rows / (3 x rows of its diagnosis), so a "
        "class that QC thinned out teaches as much as the others",
    )
    rationale_swap: float = Field(
        0.0,
        ge=0,
        le=1,
        description="rationale_label: the share of training rows whose answer follows the "
        "rationale of another training row, drawn with the seed, whose tokens carry no loss. "
        "Without it the answer learns to copy the diagnosis from the teacher's rationale, "
        "which was written knowing the label; the student's own rationale at test time does "
        "not carry it, so the answer must also have learned to read the patient",
    )
    limit: int | None = Field(None, ge=1, description="only the first N rationale rows")
    max_length: int = Field(768, ge=64, description="tokens per sequence (prompt + target)")
    precision: Literal["auto", "bf16-mixed", "fp32"] = Field(
        "auto",
        description="auto: bf16-mixed where the hardware computes bf16 natively, else fp32 "
        "(radiag.precision); the export is saved in the same precision",
    )
    mri: MriSettings = Field(default_factory=MriSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _swap_needs_a_rationale_before_the_answer(self) -> DistillConfig:
        if self.rationale_swap and self.loss != "rationale_label":
            raise ValueError(
                f"rationale_swap applies to loss rationale_label only (this student: {self.loss})"
            )
        return self

    def resolved(self) -> DistillConfig:
        """`precision: auto` resolved where the workers train (radiag.precision): bf16 mixed
        precision where bf16 is native, else fp32 (fp16 would need loss scaling, which the
        training loop does not do)."""
        if self.precision != "auto":
            return self
        native = resolve_for("auto", on_gpu=self.scaling.use_gpu) == "bfloat16"
        return self.model_copy(update={"precision": "bf16-mixed" if native else "fp32"})

    @property
    def export_dtype(self) -> ResolvedDtype:
        """The precision the trained student is saved in: the one it trained in."""
        return "float32" if self.precision == "fp32" else "bfloat16"


class StudentDiagnoseConfig(StrictModel):
    """Diagnosis of the test split by a trained student (Ray Data, transformers)."""

    scheduling_fields: ClassVar[frozenset[str]] = frozenset(
        {"limit", "batch_size", "replicas", "threads_per_replica"}
    )  # how fast, not what: left out of the stage identity

    split: Literal["train", "val", "test"] = "test"
    limit: int | None = Field(
        None, ge=1, description="only N patients: those with an MRI first, then by patient_id"
    )
    batch_size: int = Field(8, ge=1)
    replicas: int = Field(1, ge=1)
    max_new_tokens: int = Field(160, ge=1)
    generate_rationale: bool = Field(
        True, description="write a rationale (step_by_step students can answer without one)"
    )
    constrain_answer: bool = Field(
        True, description="answer = an option chosen by `decision`; false: parse the written line"
    )
    decision: Literal["balanced", "validation", "most_probable"] = Field(
        "balanced",
        description="how a constrained answer is chosen from the three probabilities. "
        "balanced: the option with the greatest probability over its share of the student's "
        "training rows (the rule that maximizes expected balanced accuracy: it undoes the "
        "class mix the training rows had, e.g. after QC kept few MCI rationales); "
        "validation: the stage first answers the val split, fits a log offset per class "
        "that maximizes balanced accuracy there, and adds them to the log-probabilities "
        "(a transferred or served student uses those of the run that trained it); "
        "most_probable: the plain argmax",
    )
    threads_per_replica: int = Field(2, ge=1)
    dtype: Dtype = Field(
        "auto", description="precision the student runs in; auto: as radiag.precision decides"
    )

    def resolved(self) -> StudentDiagnoseConfig:
        """`dtype: auto` resolved for this machine's CPU (students diagnose on CPU workers)."""
        return self.model_copy(update={"dtype": resolve_for(self.dtype, on_gpu=False)})


class AnswerWithoutRationaleError(UserError, ValueError):
    """A rationale-then-label student asked to answer without writing its rationale."""


def require_rationale_where_trained(loss: LossName, cfg: StudentDiagnoseConfig, what: str) -> None:
    """A `rationale_label` student learned its answer after its own rationale: scored right
    after the prompt it would answer a sequence it never saw (measured: chance level).

    Raises:
        AnswerWithoutRationaleError: naming the student and the field to set.
    """
    if loss == "rationale_label" and not cfg.generate_rationale:
        raise AnswerWithoutRationaleError(
            f"{what}: loss rationale_label puts the answer after the student's own "
            "rationale, so it cannot answer with generate_rationale: false; set "
            "students.diagnose.generate_rationale: true (label and step_by_step students "
            "can answer without one)"
        )


class StudentsConfig(StrictModel):
    """Both students and their diagnosis stage; a null student is skipped by `radiag run`."""

    text: DistillConfig | None = None
    vlm: DistillConfig | None = None
    diagnose: StudentDiagnoseConfig = Field(default_factory=StudentDiagnoseConfig)

    @model_validator(mode="after")
    def _frozen_needs_an_image(self) -> StudentsConfig:
        if self.text is not None and self.text.finetune == "frozen":
            raise ValueError("students.text.finetune 'frozen' would train nothing")
        return self

    @model_validator(mode="after")
    def _rationale_students_write_theirs(self) -> StudentsConfig:
        for kind in ("text", "vlm"):
            student: DistillConfig | None = getattr(self, kind)
            if student is not None:
                require_rationale_where_trained(student.loss, self.diagnose, f"students.{kind}")
        return self


class MriOnlyConfig(StrictModel):
    """The MRI-only classifier (radiag/mri_only.py): the encoder, its input volumes and its
    training."""

    encoder: EncoderName = "densenet_small"
    feature_dim: int = Field(64, ge=8, description="encoder output, the linear head's input")
    volumes: VolumeConfig = Field(
        default_factory=lambda: VolumeConfig(pixdim_mm=4.0, spatial_size=(48, 64, 48))
    )
    optim: OptimSettings = Field(
        default_factory=lambda: OptimSettings(lr=1e-3, epochs=8, batch_size=8)
    )
    threads: int = Field(2, ge=1, description="CPUs of the training task (torch threads)")
    seed: int = 0
