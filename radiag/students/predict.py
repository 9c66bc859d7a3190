"""`radiag diagnose --model text|vlm`: a trained student diagnoses the test split.

Rows are sharded over predictor replicas (Ray Data actors, one model each) and
written as part files under `predictions/student-<kind>/` in the shared output
shape, so a re-run skips finished patients like the teacher stages do.

Per patient, with greedy decoding:
1. the rationale: generated from the zero-shot prompt (the `[rationale]` task for a
   step-by-step student), stopped where the student starts its final line;
2. class probabilities: the log-likelihood the student gives each of the three
   answer options right after `Final Diagnosis:` (following its own rationale, or
   after the `[label]` prompt for a step-by-step student), softmaxed over the three; the
   text before the options is forwarded once for all three (`StudentModel.option_nll`);
3. the diagnosis: with `constrain_answer` (default, as for the teacher) an option chosen
   from the probabilities by `decision`: by default the greatest probability over that
   option's share of the student's training rows (see `decide`), or with `validation` the
   greatest log-probability plus a per-class offset fitted on the val split, which the
   stage answers first under `predictions/student-<kind>/validation/` (`fit_offsets`);
   without it, the student writes its final line freely and the line is parsed (an
   unparsable line leaves the diagnosis null, with a reason).
"""

from __future__ import annotations

import datetime
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from radiag.cohort.schema import Label
from radiag.cohort.split import first_patients
from radiag.cohort.stages import SPLITS_STAGE
from radiag.contract import (
    StageIdentity,
    StageNotReady,
    StageSummary,
    config_identity,
    run_stage,
    upstream,
)
from radiag.errors import UserError
from radiag.outputs import (
    PROBABILITY_COLUMNS,
    failure_counts,
    predictions_dir,
    read_parts,
    still_to_do,
    write_part,
)
from radiag.store import RunStore
from radiag.students.config import (
    FINAL_MARKER,
    DistillConfig,
    StudentDiagnoseConfig,
    StudentKind,
    distill_stage,
    model_name,
    require_rationale_where_trained,
    stage_dir,
    student_diagnose_stage,
)
from radiag.students.distill import class_weights, load_final
from radiag.students.formatting import (
    encode_prompt,
    option_ids,
    prompt_kinds,
    student_messages,
)
from radiag.students.volumes import load_volume, prepare_volumes
from radiag.teacher.parsing import parse_answer
from radiag.teacher.prompts import FINAL


class NoTrainingMixError(UserError, ValueError):
    """A student export that does not record its training rows' class mix."""


def training_prior(info: dict[str, Any], what: str) -> torch.Tensor:
    """Each option's share of the student's training rows (in `Label` order), as the loss
    weighed them (`balance_classes` evens them out), add-one smoothed so that a class the
    rows lacked does not divide by zero.

    Raises:
        NoTrainingMixError: the export (`what`) predates the recorded `label_counts`.
    """
    counts = info.get("label_counts")
    if counts is None:
        raise NoTrainingMixError(
            f"{what}: the student's export records no label_counts (it was exported by an "
            "older radiag), so the balanced decision cannot divide out its training mix; "
            "retrain it, or set students.diagnose.decision: most_probable"
        )
    weights = class_weights(counts, bool(info.get("config", {}).get("balance_classes")))
    weighed = [counts[str(label)] * weights[str(label)] for label in Label]
    rows = torch.tensor(weighed, dtype=torch.float64)
    return (rows + 1) / (rows.sum() + len(Label))


class NoFittedDecisionError(UserError, ValueError):
    """`decision: validation` where no diagnose stage has fitted its offsets."""


OFFSET_STEP = 0.1  # log-probability units
OFFSET_GRID = np.round(np.arange(-4.0, 4.0 + OFFSET_STEP / 2, OFFSET_STEP), 1)
FITTED_DECISION = "decision.json"


def validation_dir(kind: StudentKind) -> str:
    """Where the diagnose stage keeps a student's answers on the val split, and the decision
    it fitted on them (`decision: validation`)."""
    return f"{predictions_dir(model_name(kind))}/validation"


def fit_offsets(probabilities: np.ndarray, labels: Sequence[str]) -> tuple[dict[str, float], float]:
    """Per-class log offsets (CN's fixed at 0) for which `argmax(log p + offset)` has the
    greatest balanced accuracy on these labelled rows, and that accuracy.

    A grid search over `OFFSET_GRID` for AD and MCI; of equally good offsets, those nearest
    zero (the plain argmax) win. Balanced accuracy averages the recall of the classes
    present in `labels`. Measured against the other rules in `docs/experiments.md`: on the
    CPU preset it scored above both for every student of a run.

    Args:
        probabilities: (n, 3) in `Label` order.
        labels: the n rows' true labels.
    """
    log_p = np.log(np.clip(probabilities, 1e-12, None))
    free = [i for i, label in enumerate(Label) if label != Label.CN]
    offsets = np.zeros((OFFSET_GRID.size**2, len(Label)))
    offsets[:, free] = np.stack(np.meshgrid(OFFSET_GRID, OFFSET_GRID), axis=-1).reshape(-1, 2)
    predicted = (log_p[None] + offsets[:, None]).argmax(axis=2)  # (offsets, rows)
    truth = np.array([list(Label).index(Label(label)) for label in labels])
    score = np.mean(
        [(predicted[:, truth == c] == c).mean(axis=1) for c in np.unique(truth)], axis=0
    )
    best = np.lexsort((np.abs(offsets).sum(axis=1), -np.round(score, 12)))[0]
    fitted = {str(label): float(offsets[best, i]) for i, label in enumerate(Label)}
    return fitted, float(score[best])


def read_fitted_offsets(store: RunStore, kind: StudentKind) -> dict[str, float]:
    """The offsets the run's diagnose stage fitted on its val split.

    Raises:
        NoFittedDecisionError: it fitted none (never run, or run with another decision).
    """
    path = f"{validation_dir(kind)}/{FITTED_DECISION}"
    if not store.exists(path):
        raise NoFittedDecisionError(
            f"{store.uri_of(path)} is missing: decision validation uses the offsets the run's "
            f"own `radiag diagnose --model {kind}` fits on its val split with "
            "students.diagnose.decision: validation; run that first, or choose another decision"
        )
    return store.read_json(path)["offsets"]


def decide(probabilities: torch.Tensor, prior: torch.Tensor | None) -> int:
    """The chosen option's index: the most probable one, or with a `prior` the one with the
    greatest probability over its training share.

    A student's probabilities carry the class mix of its training rows. Dividing it out
    picks the class c with the greatest p(x | c): the Bayes rule for balanced accuracy, the
    paper's metric, which weighs every class's recall alike. Without it a student trained
    on QC-passed rationales (few of them MCI) answered one class for every patient while
    its probabilities still ranked the patients. A briefly trained student's probabilities
    carry less of the mix than that, and then the rule over-corrects: measured both ways
    on one run in `docs/experiments.md`.
    """
    scores = probabilities.double() if prior is None else probabilities.double() / prior
    return int(scores.argmax())


class StudentDiagnoser:
    """One exported student, loaded: diagnoses descriptions (and T1 volumes for the MRI+text
    student). The batch stage and the Serve deployment share it, so they answer alike.
    `decision` is how its constrained answers are chosen (None: answers are parsed);
    `offsets` are those `decision: validation` adds (`read_fitted_offsets`)."""

    def __init__(
        self, directory: Path, cfg: StudentDiagnoseConfig, offsets: dict[str, float] | None = None
    ) -> None:
        from transformers import AutoTokenizer, StoppingCriteriaList, StopStringCriteria

        self.cfg = cfg.resolved()
        self.model, self.info = load_final(directory, self.cfg.dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(directory / "lm")
        self.trained = DistillConfig.model_validate(self.info["config"])
        require_rationale_where_trained(self.trained.loss, self.cfg, str(directory))
        self.label_kind, self.rationale_kind = prompt_kinds(self.trained.loss)
        self.options = [option_ids(self.tokenizer, label) for label in Label]
        # Only a constrained answer is decided; a free one is parsed and needs no prior.
        self.decision = self.cfg.decision if self.cfg.constrain_answer else None
        self.offsets = offsets if self.decision == "validation" else None
        self.prior = self._prior(str(directory))
        # Built once: `generate(stop_strings=...)` rebuilds this per call, and its cache keys
        # on the vocabulary's order, which a fast tokenizer does not keep (~0.9 s a call).
        self.stop_at_final = StoppingCriteriaList(
            [StopStringCriteria(self.tokenizer, [FINAL])] if cfg.constrain_answer else []
        )

    def _prior(self, what: str) -> torch.Tensor | None:
        """What `decide` divides the probabilities by; None for the plain argmax."""
        if self.decision == "balanced":
            return training_prior(self.info, what)
        if self.decision != "validation":
            return None
        if self.offsets is None:
            raise NoFittedDecisionError(
                f"{what}: decision validation needs the offsets its run's diagnose stage "
                "fitted on the val split (radiag.students.predict.read_fitted_offsets)"
            )
        # Dividing p by exp(-offset) adds the offset to log p.
        return torch.tensor([-self.offsets[str(label)] for label in Label]).double().exp()

    @property
    def needs_volume(self) -> bool:
        return self.info["kind"] == "vlm"

    def diagnose(
        self, descriptions: list[str], volumes: torch.Tensor | None
    ) -> list[dict[str, Any]]:
        """Rationale, class probabilities and diagnosis per description; `volumes` is
        (B, 1, D, H, W) for the MRI+text student, None for the text one."""
        with torch.inference_mode():
            return self._diagnose(descriptions, volumes)

    def _diagnose(
        self, descriptions: list[str], volumes: torch.Tensor | None
    ) -> list[dict[str, Any]]:
        writes_rationale = self.cfg.generate_rationale and self.trained.loss != "label"
        n = len(descriptions)
        texts: list[str | None] = [None] * n
        prompt_tokens, completion_tokens = [0] * n, [0] * n
        finish: list[str | None] = [None] * n
        if writes_rationale or not self.cfg.constrain_answer:
            prompts = [self._prompt(d, self.rationale_kind) for d in descriptions]
            texts, completion_tokens, finish = self._generate(prompts, volumes)
            prompt_tokens = [len(p) for p in prompts]
        rationales = [(t.split(FINAL)[0].strip() if t is not None else None) for t in texts]
        probabilities = self._option_probabilities(descriptions, rationales, volumes)
        out = []
        for i, probs in enumerate(probabilities):
            record: dict[str, Any] = {
                "rationale": rationales[i] if writes_rationale else None,
                **{PROBABILITY_COLUMNS[label]: float(p) for label, p in zip(Label, probs, strict=True)},
                "prompt_tokens": prompt_tokens[i], "completion_tokens": completion_tokens[i],
                "finish_reason": finish[i],
            }  # fmt: skip
            if self.cfg.constrain_answer:
                record["diagnosis"] = str(list(Label)[decide(probs, self.prior)])
            else:
                parsed = parse_answer(texts[i] or "", finish[i])
                record["diagnosis"] = str(parsed.diagnosis) if parsed.diagnosis else None
                record["parse_error"] = parsed.reason
            out.append(record)
        return out

    def _prompt(self, description: str, kind: Any) -> list[int]:
        return encode_prompt(self.tokenizer, student_messages(description or "", kind))

    def _generate(
        self, prompts: list[list[int]], volumes: torch.Tensor | None
    ) -> tuple[list[str | None], list[int], list[str | None]]:
        """Greedy continuation of each prompt; stops at the final line when it is constrained."""
        inputs, mask = self.model.embed(prompts, volumes, pad_left=True)
        generated = self.model.lm.generate(
            inputs_embeds=inputs, attention_mask=mask, max_new_tokens=self.cfg.max_new_tokens,
            do_sample=False, pad_token_id=self.model.pad_token_id,
            stopping_criteria=self.stop_at_final,
        )  # fmt: skip
        texts, counts, reasons = [], [], []
        for row in generated.tolist():
            tokens = [t for t in row if t != self.model.pad_token_id]
            ended = self.tokenizer.eos_token_id in tokens
            tokens = tokens[: tokens.index(self.tokenizer.eos_token_id)] if ended else tokens
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            texts.append(text)
            counts.append(len(tokens))
            stopped = ended or (self.cfg.constrain_answer and FINAL in text)
            reasons.append("stop" if stopped else "length")
        return texts, counts, reasons

    def _option_probabilities(
        self, descriptions: list[str], rationales: list[str | None], volumes: torch.Tensor | None
    ) -> torch.Tensor:
        """(B, 3) softmax over the summed log-likelihood of each answer option."""
        prefixes = []
        for description, rationale in zip(descriptions, rationales, strict=True):
            prompt = self._prompt(description, self.label_kind)
            lead = f"{rationale}\n{FINAL}" if rationale and self.label_kind is None else FINAL
            prefixes.append(prompt + self.tokenizer.encode(lead, add_special_tokens=False))
        nll = self.model.option_nll(prefixes, self.options, volumes)
        return torch.softmax(-nll, dim=1)


def download_student(store: RunStore, kind: StudentKind) -> Path:
    """A local copy of the run's exported student (workers may not share the run's disk)."""
    local = Path(tempfile.mkdtemp(prefix="radiag-student-"))
    store.download_dir(f"{stage_dir(kind)}/final", local)
    return local


class StudentPredictor:
    """A Ray Data actor: one `StudentDiagnoser`; diagnoses a batch and writes it.

    The student comes from the run at `models_uri`: this run, or the trained run whose
    student diagnoses another cohort (`radiag transfer`). Its answers go to `out_dir`.
    """

    def __init__(
        self,
        kind: StudentKind,
        cfg: dict[str, Any],
        store_uri: str,
        models_uri: str,
        out_dir: str,
        offsets: dict[str, float] | None,
    ) -> None:
        self.kind, self.out_dir = kind, out_dir
        self.cfg = StudentDiagnoseConfig.model_validate(cfg)
        self.store = RunStore(store_uri)
        torch.set_num_threads(self.cfg.threads_per_replica)
        student = download_student(RunStore(models_uri), kind)
        self.student = StudentDiagnoser(student, self.cfg, offsets)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        start = time.perf_counter()
        usable = [r for r in rows if r["error"] is None]
        results = {r["patient_id"]: self._base(r) | {"error": r["error"]} for r in rows}
        if usable:
            answers = self.student.diagnose(
                [r["description"] or "" for r in usable], self._volumes(usable)
            )
            for row, out in zip(usable, answers, strict=True):
                results[row["patient_id"]] |= out
        seconds = (time.perf_counter() - start) / len(rows)
        out_rows = [r | {"latency_s": seconds} for r in results.values()]
        write_part(self.store, self.out_dir, out_rows)
        return pa.table({"rows": [len(rows)], "errors": [len(rows) - len(usable)]})

    def _base(self, row: dict[str, Any]) -> dict[str, Any]:
        sampling = {"greedy": True, "max_new_tokens": self.cfg.max_new_tokens,
                    "constrain_answer": self.cfg.constrain_answer,
                    "decision": self.student.decision, "offsets": self.student.offsets}  # fmt: skip
        return {
            "patient_id": row["patient_id"], "task": "diagnose", "prompt_version": "v1",
            "engine": "transformers", "model": model_name(self.kind), "dtype": self.cfg.dtype,
            "sampling": json.dumps(sampling), "seed": 0, "attempts": 1,
            "prompt_tokens": 0, "completion_tokens": 0,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }  # fmt: skip

    def _volumes(self, rows: list[dict[str, Any]]) -> torch.Tensor | None:
        if self.kind != "vlm":
            return None
        return torch.stack(
            [torch.from_numpy(load_volume(self.store, r["volume_path"])) for r in rows]
        )  # (B, 1, D, H, W)


def _inputs(
    kind: StudentKind, cfg: StudentDiagnoseConfig, store: RunStore, trained: DistillConfig
) -> pa.Table:
    """Test rows (no label column), with the preprocessed volume or the reason there is none;
    volumes are preprocessed as the `trained` student was trained."""
    table = first_patients(store.read_table(f"splits/{cfg.split}.parquet"), cfg.limit)
    table = table.select(["patient_id", "description", "mri_path"])
    if kind != "vlm":
        return table.append_column(
            "volume_path", pa.nulls(table.num_rows, pa.string())
        ).append_column("error", pa.nulls(table.num_rows, pa.string()))
    imaged = table.filter(pc.is_valid(table["mri_path"]))
    prepared = prepare_volumes(
        imaged.select(["patient_id", "mri_path"]), trained.mri.volumes, store
    )
    by_id = {r["patient_id"]: r for r in prepared.table.to_pylist()}
    volume_paths, errors = [], []
    for pid in table["patient_id"].to_pylist():
        found = by_id.get(pid)
        volume_paths.append(found["volume_path"] if found and not found["error"] else None)
        errors.append(found["error"] if found else f"patient {pid}: no MRI")
    return table.append_column("volume_path", pa.array(volume_paths, pa.string())).append_column(
        "error", pa.array(errors, pa.string())
    )


def run_student_diagnose(
    kind: StudentKind,
    cfg: StudentDiagnoseConfig,
    store: RunStore,
    fresh: bool = False,
    models: RunStore | None = None,
) -> StageSummary:
    """Diagnose every input row not yet in `predictions/student-<kind>/`, under the stage
    contract: a retrained student is another identity, never mixed with the old one's rows.

    Args:
        kind: which student.
        cfg: the diagnosis config.
        store: the run whose split is diagnosed and where the predictions go.
        fresh: move another identity's predictions aside instead of refusing.
        models: the run the trained student comes from (its distill stage is upstream).
            Default: `store`.
    """
    models = models or store
    final = f"{stage_dir(kind)}/final/{FINAL_MARKER}"
    if not models.exists(final):
        raise StageNotReady(
            f"no trained {kind} student in {models.uri_of(stage_dir(kind))}: "
            f"run `radiag distill --student {kind}` first"
        )
    trained = DistillConfig.model_validate(models.read_json(final)["config"])
    require_rationale_where_trained(trained.loss, cfg, f"the {model_name(kind)} of {models.uri}")
    stage = student_diagnose_stage(kind)
    cfg = cfg.resolved()
    fits_here = models.uri == store.uri
    reads = upstream(store, [SPLITS_STAGE]) | upstream(models, [distill_stage(kind)])
    if fits_a_decision(cfg) and not fits_here:  # a transfer: the trained run's offsets
        reads |= upstream(models, [stage])
    identity = StageIdentity(stage=stage.name, config=config_identity(cfg), upstream=reads)
    return run_stage(
        store, stage, identity, lambda: _diagnose_all(kind, cfg, store, models, trained), fresh
    )


def fits_a_decision(cfg: StudentDiagnoseConfig) -> bool:
    """Whether answers are chosen with offsets fitted on the val split."""
    return cfg.constrain_answer and cfg.decision == "validation"


def _diagnose_all(
    kind: StudentKind,
    cfg: StudentDiagnoseConfig,
    store: RunStore,
    models: RunStore,
    trained: DistillConfig,
) -> StageSummary:
    start = time.perf_counter()
    details: dict[str, Any] = {}
    offsets = None
    if fits_a_decision(cfg) and models.uri == store.uri:
        details["validation"] = _fit_on_validation(kind, cfg, store, trained)
        offsets = details["validation"]["offsets"]
    elif fits_a_decision(cfg):
        offsets = read_fitted_offsets(models, kind)
    directory = predictions_dir(model_name(kind))
    inputs, answered_now = _answer_split(kind, cfg, store, models, trained, directory, offsets)
    output = read_parts(store, directory)
    return StageSummary(
        stage=f"diagnose-{model_name(kind)}",
        counts={
            "rows": output.num_rows,
            "generated_now": answered_now,
            "skipped_done": inputs - answered_now,
            **failure_counts(output),
        },
        details={"seconds": round(time.perf_counter() - start, 2), **details},
    )


def _answer_split(
    kind: StudentKind,
    cfg: StudentDiagnoseConfig,
    store: RunStore,
    models: RunStore,
    trained: DistillConfig,
    directory: str,
    offsets: dict[str, float] | None,
) -> tuple[int, int]:
    """Answer every row of `cfg.split` not yet in `directory`; returns (rows, answered now)."""
    import ray

    inputs = _inputs(kind, cfg, store, trained)
    todo = still_to_do(inputs, read_parts(store, directory))
    if todo.num_rows:
        blocks = [todo.slice(i, cfg.batch_size) for i in range(0, todo.num_rows, cfg.batch_size)]
        counts = ray.data.from_arrow(blocks).map_batches(
            StudentPredictor,
            fn_constructor_kwargs={"kind": kind, "cfg": cfg.model_dump(mode="json"),
                                   "store_uri": store.uri, "models_uri": models.uri,
                                   "out_dir": directory, "offsets": offsets},
            batch_size=cfg.batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.replicas),
            num_cpus=1,
        )  # fmt: skip
        counts.materialize()
    return inputs.num_rows, todo.num_rows


def _fit_on_validation(
    kind: StudentKind, cfg: StudentDiagnoseConfig, store: RunStore, trained: DistillConfig
) -> dict[str, Any]:
    """Answer the val split (resumably, as the test split is answered, blind to the labels),
    fit the offsets on those answers and the split's labels, and keep the fit beside them."""
    directory = validation_dir(kind)
    answering = cfg.model_copy(update={"split": "val", "decision": "most_probable"})
    rows, answered_now = _answer_split(kind, answering, store, store, trained, directory, None)
    columns = [PROBABILITY_COLUMNS[label] for label in Label]
    answers = read_parts(store, directory).select(["patient_id", *columns])
    labels = store.read_table(f"splits/{answering.split}.parquet").select(["patient_id", "label"])
    labelled = answers.filter(pc.is_valid(answers[columns[0]])).join(labels, "patient_id")
    labelled = labelled.filter(pc.is_valid(labelled["label"]))
    if not labelled.num_rows:
        raise NoFittedDecisionError(
            f"{store.uri_of(directory)}: the student answered none of the {rows} val visits, "
            "so decision validation has nothing to fit (the errors are in those rows)"
        )
    probabilities = np.column_stack([labelled[column].to_numpy() for column in columns])
    offsets, accuracy = fit_offsets(probabilities, labelled["label"].to_pylist())
    fitted = {
        "offsets": offsets,
        "balanced_accuracy": round(accuracy, 4),
        "visits": labelled.num_rows,
        "answered_now": answered_now,
        "grid": [float(OFFSET_GRID[0]), float(OFFSET_GRID[-1]), OFFSET_STEP],
    }
    store.write_json(f"{directory}/{FITTED_DECISION}", fitted)
    return fitted
