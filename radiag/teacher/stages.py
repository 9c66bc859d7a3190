"""The teacher stages on Ray Data: rationalize (Module I) and diagnose (Module II-1).

Rows are sharded over engine replicas (Ray Data actors, one engine each). Every batch
is written by the worker that generated it as one Parquet part file, atomically, as
it goes. A re-run reads the part files already there and skips their patient_ids,
so a killed job loses no finished batch and writes no duplicate row.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field, computed_field
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from radiag.cohort.schema import Label
from radiag.cohort.split import first_patients
from radiag.cohort.stages import SPLITS_STAGE
from radiag.config import StrictModel
from radiag.contract import (
    Stage,
    StageIdentity,
    StageNotReady,
    StageSummary,
    config_identity,
    digest,
    run_stage,
    upstream,
)
from radiag.models import model_fingerprint, prepare_model
from radiag.outputs import failure_counts, predictions_dir, read_parts, still_to_do, write_part
from radiag.store import RunStore, StoreUnreachable, storage_failure
from radiag.teacher.backends import build_engine
from radiag.teacher.engines import (
    EngineConfig,
    Messages,
    SamplingConfig,
    VllmEngineConfig,
    actor_cpus,
    actor_env,
    actor_gpus,
    with_resolved_dtype,
)
from radiag.teacher.exemplars import ExemplarConfig, ExemplarPool, training_pool
from radiag.teacher.parsing import parse_answer
from radiag.teacher.prompts import (
    ANSWERS,
    DIAGNOSE_ANSWER_ONLY,
    FINAL,
    TEMPLATES,
    Reasoning,
    Shot,
    diagnose_messages,
    rationalize_messages,
)
from radiag.teacher.quality import check_rationale

RECORD_COLUMNS = (
    "MMSE", "APOE4", "grade_Hippocampus", "grade_Entorhinal", "grade_Fusiform",
    "grade_MidTemp", "grade_WholeBrain", "grade_Ventricles",
)  # fmt: skip


class TeacherStageConfig(StrictModel):
    """What both teacher stages share."""

    scheduling_fields: ClassVar[frozenset[str]] = frozenset({"limit"})  # a larger limit resumes

    engine: EngineConfig = Field(default_factory=VllmEngineConfig)
    prompt_version: Literal["v1"] = "v1"
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    limit: int | None = Field(
        None, ge=1, description="only N patients: those with an MRI first, then by patient_id"
    )
    constrain_answer: bool = Field(
        True,
        description="force the final line with structured output where the backend supports it",
    )

    def sampling_for(self, attempt: int) -> SamplingConfig:
        """The sampling of one try: each try draws with a seed of its own."""
        return self.sampling.model_copy(update={"seed": self.sampling.seed + attempt})


class RationalizeConfig(TeacherStageConfig):
    """Module I: label-conditioned rationales for the training split."""

    split: Literal["train", "val", "test"] = "train"
    regeneration_attempts: int = Field(
        1, ge=0, description="extra tries for a rationale that QC flags or that cannot be parsed"
    )
    regeneration_temperature: float = Field(
        0.7,
        ge=0,
        description="temperature of those extra tries: a greedy retry would only repeat the "
        "first try (or differ from it by the engine's rounding)",
    )

    def sampling_for(self, attempt: int) -> SamplingConfig:
        """A retry samples at `regeneration_temperature`, so it can write another rationale."""
        sampling = super().sampling_for(attempt)
        if attempt == 0:
            return sampling
        return sampling.model_copy(update={"temperature": self.regeneration_temperature})


class DiagnoseConfig(TeacherStageConfig):
    """Module II-1: few-shot chain-of-thought diagnosis of the test split."""

    split: Literal["train", "val", "test"] = "test"
    exemplars: ExemplarConfig = Field(default_factory=ExemplarConfig)
    reasoning: Reasoning = Field(
        "chain_of_thought",
        description="chain_of_thought: reason, then the final line; answer_only: the final "
        "line alone (exemplars show only theirs)",
    )


class TeacherSummary(BaseModel):
    stage: str
    rows: int
    generated_now: int
    retried: int  # rows that had failed for a transient reason and were generated again
    skipped_done: int
    errors: int
    retry_pending: int  # rows still failed for a transient reason: the next run retries them
    unparsed: int
    qc_flagged: int
    output_tokens_now: int
    seconds: float

    @computed_field
    @property
    def qc_flag_rate(self) -> float:
        return self.qc_flagged / self.rows if self.rows else 0.0

    def as_stage_summary(self) -> StageSummary:
        counts = self.model_dump(exclude={"stage", "seconds", "qc_flag_rate"})
        details = {"qc_flag_rate": self.qc_flag_rate, "seconds": self.seconds}
        return StageSummary(stage=self.stage, counts=counts, details=details)


def output_dir(task: str) -> str:
    return "rationales" if task == "rationalize" else predictions_dir("teacher")


def read_output(store: RunStore, task: str) -> pa.Table:
    """Every row a teacher stage has written so far, or an empty table."""
    return read_parts(store, output_dir(task))


class TeacherWorker:
    """A Ray Data actor: owns one engine, generates a batch, writes it, returns its counts.

    `__call__` is async and the actor runs `batches_in_flight` batches at once, so the
    engine always has rows: each row is its own request, and a row's steps (the forced
    final line, a QC regeneration) follow it at once, not the slowest row of its block.
    """

    def __init__(
        self, task: str, cfg: dict[str, Any], store_uri: str, pool: ExemplarPool | None
    ) -> None:
        self.task = task
        # Only a validated config crosses the Ray boundary, and it is validated again here.
        model = RationalizeConfig if task == "rationalize" else DiagnoseConfig
        self.cfg = model.model_validate(cfg)
        self.store = RunStore(store_uri)
        self.pool = pool
        self.engine = build_engine(self.cfg.engine)
        self.ready_at = time.time()  # the engine is up: its idle time counts from here
        self.regenerated = Counter[str]()
        self.reported: dict[str, float] = {}

    async def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        work = self._rationalize if self.task == "rationalize" else self._diagnose
        out = await work(rows)
        await asyncio.to_thread(write_part, self.store, output_dir(self.task), out)
        counts = {
            "rows": len(out),
            "errors": sum(r["error"] is not None for r in out),
            "transient": sum(bool(r.get("transient")) for r in out),
            "unparsed": sum(r["error"] is None and r["diagnosis"] is None for r in out),
            "qc_flagged": sum(bool(r.get("qc_flagged")) for r in out),
            "output_tokens": sum(r["completion_tokens"] for r in out),
        }
        return pa.table({k: [v] for k, v in (counts | self._engine_counts()).items()})

    def _engine_counts(self) -> dict[str, float]:
        """This actor's engine totals since its last batch (so the batches sum to its totals),
        and when its engine became ready."""
        totals = self.engine.stats.totals() | dict(self.regenerated)
        since = {k: v - self.reported.get(k, 0) for k, v in totals.items()}
        self.reported = totals
        return (
            {"regenerated_rows": 0, "regenerated_tokens": 0} | since | {"ready_at": self.ready_at}
        )

    def _base(self, row: dict[str, Any], attempt: int, sampling: SamplingConfig) -> dict[str, Any]:
        """Provenance shared by every output row."""
        return {
            "patient_id": row["patient_id"],
            "task": self.task,
            "prompt_version": self.cfg.prompt_version,
            "engine": self.engine.backend,
            "model": self.engine.model,
            "dtype": getattr(self.cfg.engine, "dtype", None),  # none for an HTTP endpoint
            "sampling": sampling.model_dump_json(),
            "seed": sampling.seed,
            "attempts": attempt + 1,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }

    async def _generate(self, row: dict[str, Any], conversation: Messages, attempt: int) -> dict:
        """One row, one engine request; a row whose input is unusable gets an error without one."""
        sampling = self.cfg.sampling_for(attempt)
        record = self._base(row, attempt, sampling)
        if not (row.get("description") or "").strip():
            return record | {
                "error": "missing description",
                "prompt_tokens": 0,
                "completion_tokens": 0,
            }
        constrain = self.cfg.constrain_answer
        done = await self.engine.complete(
            conversation,
            sampling,
            answer_prefix=FINAL if constrain else None,
            answer_choices=list(ANSWERS.values()) if constrain else None,
        )
        parsed = parse_answer(done.text, done.finish_reason) if done.error is None else None
        return record | {
            "rationale": parsed.rationale if parsed else None,
            "diagnosis": str(parsed.diagnosis) if parsed and parsed.diagnosis else None,
            "parse_error": parsed.reason if parsed else None,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "latency_s": done.latency_s,
            "error": done.error,
            "transient": done.transient,
        }  # fmt: skip

    async def _rationalize(self, rows: list[dict]) -> list[dict]:
        return list(await asyncio.gather(*(self._rationale(row) for row in rows)))

    async def _rationale(self, row: dict[str, Any]) -> dict:
        """Generate and check; regenerate what QC flags or cannot be parsed, at once.

        The last attempt stands; `attempts` says how many were made.
        """
        conversation = rationalize_messages(
            row.get("description") or "", Label(row["label"]), self.cfg.prompt_version
        )
        result = self._check(row, await self._generate(row, conversation, 0))
        for attempt in range(1, self.cfg.regeneration_attempts + 1):
            if result["error"] is not None or not (
                result.get("qc_flagged") or result["diagnosis"] is None
            ):
                break
            result = self._check(row, await self._generate(row, conversation, attempt))
            self.regenerated["regenerated_rows"] += 1
            self.regenerated["regenerated_tokens"] += result["completion_tokens"]
        return result

    def _check(self, row: dict[str, Any], result: dict) -> dict:
        result["label_shown"] = row["label"]
        if result["error"] is None:
            reasons = rationale_qc(row, result["rationale"], result["diagnosis"])
            result["qc_flagged"], result["qc_reasons"] = bool(reasons), reasons
        return result

    async def _diagnose(self, rows: list[dict]) -> list[dict]:
        assert self.pool is not None
        shots = self.pool.select(
            [r.get("description") or "" for r in rows], exclude_ids=[r["patient_id"] for r in rows]
        )
        conversations = [
            diagnose_messages(
                row.get("description") or "",
                [Shot(s.description, s.rationale, Label(s.label)) for s in chosen],
                self.cfg.prompt_version,
                self.cfg.reasoning,
            )
            for row, chosen in zip(rows, shots, strict=True)
        ]
        results = await asyncio.gather(
            *(self._generate(row, c, 0) for row, c in zip(rows, conversations, strict=True))
        )
        for result, chosen in zip(results, shots, strict=True):
            result["exemplar_ids"] = [s.patient_id for s in chosen]
        return list(results)


def rationale_qc(row: dict[str, Any], rationale: str, diagnosis: str | None) -> list[str]:
    """Rule-based QC of one rationale for a training row (its record and label): why it
    argues for another class or contradicts the record; empty when it passes. The same
    rules for generated and imported rationales."""
    reasons = list(
        check_rationale(rationale, {c: row.get(c) for c in RECORD_COLUMNS}, row["label"]).reasons
    )
    if diagnosis is not None and diagnosis != row["label"]:
        reasons.append(f"final answer {diagnosis} differs from the label {row['label']}")
    return reasons


def _inputs(store: RunStore, task: str, split: str, limit: int | None) -> pa.Table:
    """The rows a stage works on. Diagnosis input holds no label column at all."""
    table = store.read_table(f"splits/{split}.parquet")
    if task == "rationalize":
        table = table.filter(pc.is_valid(table["label"]))  # a rationale explains a known label
        columns = ["patient_id", "description", "label", *RECORD_COLUMNS]
    else:
        columns = ["patient_id", "description"]
    return first_patients(table, limit).select(columns)


def exemplar_pool(store: RunStore, cfg: DiagnoseConfig) -> ExemplarPool:
    """Exemplars come from the training split only, with their teacher rationales."""
    rationales = read_output(store, "rationalize")
    if rationales.num_rows == 0:
        raise StageNotReady(
            f"{store.uri_of('rationales')} is empty: run `radiag rationalize` before few-shot diagnosis"
        )
    usable = rationales.filter(
        pc.and_(pc.is_null(rationales["error"]), pc.is_valid(rationales["rationale"]))
    )
    return ExemplarPool.build(
        training_pool(store.read_table("splits/train.parquet"), usable), cfg.exemplars
    )


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[tokens_per_s]:.0f} tok/s"), TimeElapsedColumn(),
    )  # fmt: skip


def run_teacher(
    task: str,
    cfg: RationalizeConfig | DiagnoseConfig,
    store: RunStore,
    on_batch: Callable[[dict[str, int]], None] = lambda _: None,
    exemplars: RunStore | None = None,
) -> TeacherSummary:
    """Generate for every input row not yet in the output; returns counts for the whole output.

    Args:
        task: "rationalize" or "diagnose".
        cfg: the stage config.
        store: the run store.
        on_batch: called with each finished batch's counts as it arrives (benchmarks).
        exemplars: the run whose training split and rationales give the few-shot
            exemplars (another cohort is diagnosed with the trained run's). Default: `store`.
    """
    import ray

    inputs = _inputs(store, task, cfg.split, cfg.limit)
    done = read_output(store, task)
    todo = still_to_do(inputs, done)
    retried = pc.sum(pc.is_in(todo["patient_id"], done["patient_id"])).as_py() or 0
    pool = exemplar_pool(exemplars or store, cfg) if isinstance(cfg, DiagnoseConfig) else None
    start = time.perf_counter()
    tokens = 0
    if todo.num_rows:
        engine = cfg.engine
        if isinstance(engine, VllmEngineConfig):
            prepare_model(engine.model, dtype=engine.dtype)  # once, before the replicas start
        # One block per engine call, so finished batches stream back (and are written) as they go.
        blocks = [
            todo.slice(i, engine.batch_size) for i in range(0, todo.num_rows, engine.batch_size)
        ]
        results = ray.data.from_arrow(blocks).map_batches(
            TeacherWorker,
            fn_constructor_kwargs={
                "task": task,
                "cfg": cfg.model_dump(mode="json"),
                "store_uri": store.uri,
                "pool": pool,
            },
            batch_size=engine.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                size=engine.replicas,
                max_tasks_in_flight_per_actor=engine.batches_in_flight,
                max_concurrent_calls_per_actor=engine.batches_in_flight,
            ),
            num_gpus=actor_gpus(engine),
            num_cpus=actor_cpus(engine),
            runtime_env=actor_env(engine),
        )
        with _progress() as progress:
            bar = progress.add_task(task, total=todo.num_rows, tokens_per_s=0.0)
            for batch in _iter_counts(results):
                on_batch(batch)
                tokens += batch["output_tokens"]
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                progress.update(bar, advance=batch["rows"], tokens_per_s=rate)
    output = read_output(store, task)
    return TeacherSummary(
        stage=task,
        rows=output.num_rows,
        generated_now=todo.num_rows,
        retried=retried,
        skipped_done=inputs.num_rows - todo.num_rows,
        **failure_counts(output),
        qc_flagged=pc.sum(pc.fill_null(output["qc_flagged"], False)).as_py() or 0,
        output_tokens_now=tokens,
        seconds=round(time.perf_counter() - start, 2),
    )


@contextlib.contextmanager
def _store_failures_named(store: RunStore) -> Iterator[None]:
    """A write or read the run store refused (an S3 outage mid-stage: pyarrow's error names
    the path or the bucket) stops the stage with one line that names the store and says
    what a rerun does, not a Ray traceback."""
    try:
        yield
    except Exception as err:
        failure = storage_failure(err)
        # pyarrow names the path, or on S3 at least the bucket: else not this store's failure
        named = store.root.split("/", 1)[0] if store.uri.startswith("s3://") else store.root
        if failure is None or named not in str(failure):
            raise
        raise StoreUnreachable(
            f"the run store {store.uri} failed while the stage wrote its rows ({failure}); "
            "every batch written before is kept: run the same command again once it is "
            "reachable, and it writes only the missing rows"
        ) from err


def _iter_counts(results: Any) -> Iterator[dict[str, int]]:
    for batch in results.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()


RATIONALIZE_STAGE = Stage("rationalize", "rationales", resumable=True)
DIAGNOSE_STAGE = Stage("diagnose", predictions_dir("teacher"), resumable=True)


def teacher_identity(
    task: str,
    cfg: RationalizeConfig | DiagnoseConfig,
    store: RunStore,
    exemplars: RunStore | None = None,
) -> StageIdentity:
    """What a teacher stage's rows depend on: config, splits (+ the exemplars' rationales,
    from `exemplars`, default `store`), model, prompts."""
    reads = upstream(store, [SPLITS_STAGE])
    if task == "diagnose":
        reads |= upstream(exemplars or store, [RATIONALIZE_STAGE])
    engine = cfg.engine
    model = (
        model_fingerprint(engine.model) if isinstance(engine, VllmEngineConfig) else engine.model
    )
    return StageIdentity(
        stage=task,
        config=config_identity(cfg),
        upstream=reads,
        files={"model": model},
        versions=prompt_versions(cfg),
    )


def prompt_versions(cfg: RationalizeConfig | DiagnoseConfig) -> dict[str, str]:
    """Digests of the prompt texts a stage sends: a changed text is a new identity."""
    versions = {"prompt": digest(dataclasses.asdict(TEMPLATES[cfg.prompt_version]))}
    if isinstance(cfg, DiagnoseConfig) and cfg.reasoning == "answer_only":
        versions["answer_only"] = digest(DIAGNOSE_ANSWER_ONLY[cfg.prompt_version])
    return versions


def teacher_stage(
    task: str,
    cfg: RationalizeConfig | DiagnoseConfig,
    store: RunStore,
    fresh: bool = False,
    exemplars: RunStore | None = None,
) -> StageSummary:
    """A teacher stage under the stage contract: resumes, or refuses another identity.

    `exemplars` is the run the few-shot exemplars come from (default `store`).
    """
    stage = RATIONALIZE_STAGE if task == "rationalize" else DIAGNOSE_STAGE
    cfg = cfg.model_copy(update={"engine": with_resolved_dtype(cfg.engine)})
    with _store_failures_named(store):
        return run_stage(
            store,
            stage,
            teacher_identity(task, cfg, store, exemplars),
            lambda: run_teacher(task, cfg, store, exemplars=exemplars).as_stage_summary(),
            fresh=fresh,
        )
