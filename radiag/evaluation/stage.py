"""`radiag evaluate`: every model that wrote predictions in a run, on the same test split.

Phases, in order:
1. predictions: every `predictions/<model>/` is loaded and checked (`predictions.py`);
   a bad table is reported by file and rows and left out, the others go on.
2. diagnosis metrics per model with bootstrap CIs over subjects, and every pair of
   models compared on the patients both cover (McNemar) (`metrics.py`).
3. rationale criteria on a 1-5 scale: the automatic measures for every rationale
   (`criteria.py`), the LLM judge when `judge` is configured (`judge.py`; its engines
   run in Ray actors, `judge_engine.py`), and human
   ratings: a blinded rating sheet is always exported; filled sheets listed in
   `human_ratings` are imported and their agreement computed (`human.py`).
4. tables (Parquet, CSV, JSON), plots (PNG) and one self-contained HTML report in
   `reports/` (`report/`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import Field

from radiag.config import StrictModel
from radiag.contract import (
    Stage,
    StageIdentity,
    StageSummary,
    config_identity,
    content_digest,
    digest,
    finished_upstream,
    read_record,
    run_stage,
)
from radiag.evaluation.agreement import agreement, verbosity_bias
from radiag.evaluation.criteria import HelpfulnessReader, score_rationales
from radiag.evaluation.human import export_rating_sheet, import_ratings, inter_rater_agreement
from radiag.evaluation.judge import (
    JudgeConfig,
    compare_rationales,
    judge_rationales,
    pairwise_summary,
    rating_items,
)
from radiag.evaluation.judge_engine import ActorEngine
from radiag.evaluation.metrics import (
    ModelEvaluation,
    evaluate_model,
    paired_comparisons,
    smoke_reason,
)
from radiag.evaluation.predictions import load_predictions, model_names, test_labels
from radiag.evaluation.report import ReportInputs, write_report
from radiag.models import prepare_model
from radiag.outputs import read_parts
from radiag.store import RunStore
from radiag.students.config import distill_stage
from radiag.teacher.engines import VllmEngineConfig, with_resolved_dtype

log = logging.getLogger(__name__)

REPORTS = "reports"
RECORD_FIELDS = (
    "AGE", "PTGENDER", "PTEDUCAT", "MMSE", "APOE4", "grade_Hippocampus", "grade_Entorhinal",
    "grade_Fusiform", "grade_MidTemp", "grade_WholeBrain", "grade_Ventricles",
)  # fmt: skip
SCORE_KEYS = ["model", "patient_id", "criterion", "score", "source"]


class EvaluateConfig(StrictModel):
    """What `radiag evaluate` computes beyond the diagnosis metrics."""

    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% CIs")
    seed: int = 0
    judge: JudgeConfig | None = Field(None, description="LLM judge of rationales; null skips it")
    rating_sheet_per_model: int | None = Field(
        20, ge=1, description="rationales per model in the blinded human rating sheet"
    )
    human_ratings: list[str] = Field(
        default_factory=list, description="filled rating sheets (CSV) to import"
    )
    examples: int = Field(2, ge=0, description="best and worst rationales shown per model")


EVALUATE_STAGE = Stage("evaluate", REPORTS)


def run_evaluate(cfg: EvaluateConfig, store: RunStore, fresh: bool = False) -> StageSummary:
    """Evaluate the run in `store` and write `reports/`; see the module docstring.

    Under the stage contract, with one rule of its own: a report is derived whole from
    its inputs, so new or changed predictions re-evaluate (the old report is kept under
    `superseded/`), while another evaluation config (say, without the judge) is refused
    unless `fresh`: a richer report is never silently replaced by a poorer one.
    """
    if cfg.judge is not None:
        judge = cfg.judge.model_copy(update={"engine": with_resolved_dtype(cfg.judge.engine)})
        cfg = cfg.model_copy(update={"judge": judge})
    identity = StageIdentity(
        stage="evaluate",
        config=config_identity(cfg),
        upstream=finished_upstream(store, _evaluated_stages(store)),
        files={"inputs": digest(_inputs_listing(store, cfg))},
    )
    record = read_record(store, EVALUATE_STAGE)
    same_config = record is not None and record.identity.config == identity.config
    return run_stage(
        store, EVALUATE_STAGE, identity, lambda: _evaluate(cfg, store), fresh or same_config
    )


def _evaluate(cfg: EvaluateConfig, store: RunStore) -> StageSummary:
    truth = test_labels(store)
    predictions, problems = load_predictions(store)
    for problem in problems:
        log.warning("not evaluated: %s", problem)
    evaluations = {
        name: evaluate_model(name, table, truth, cfg.bootstrap, cfg.seed)
        for name, table in predictions.items()
    }
    test = store.read_table("splits/test.parquet").to_pandas()
    rationales = _rationale_rows(predictions)
    automatic = score_rationales(
        rationales, test.set_index("patient_id"), _helpfulness_reader(store), truth
    )
    judge = _judge(cfg, rationales, test)
    judged = judge.scores
    manifest = store.read_json("manifest.json") if store.exists("manifest.json") else {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        human, human_agreement = _human(cfg, rationales, test, out / "human")
        scored = [frame[SCORE_KEYS] for frame in (automatic, judged, human) if len(frame)]
        criteria = (
            pd.concat(scored, ignore_index=True) if scored else pd.DataFrame(columns=SCORE_KEYS)
        )
        inputs = ReportInputs(
            manifest=manifest,
            cohort_summary=_cohort_summary(store),
            cohort_distributions=_cohort_distributions(store),
            metrics=_metrics_table(evaluations, store),
            confusion={name: e.confusion for name, e in evaluations.items()},
            roc={name: e.roc for name, e in evaluations.items() if e.roc},
            reliability={name: e.reliability for name, e in evaluations.items() if len(e.reliability)},
            paired=paired_comparisons(predictions, truth),
            criteria=criteria,
            examples=_examples(automatic, rationales, test, truth, cfg.examples),
            counts=_counts(store, manifest, evaluations) | judge.checks,
            problems=problems,
            agreement=_agreements(judged, automatic, human, human_agreement),
        )  # fmt: skip
        _write_tables(inputs, evaluations, {"judge": judged, "judge_pairwise": judge.pairwise}, out)
        report = write_report(inputs, out)
        store.upload_dir(out, REPORTS)
    return StageSummary(
        stage="evaluate",
        counts={
            "models": len(evaluations),
            "problems": len(problems),
            "rationales_scored": int(automatic["patient_id"].nunique()) if len(automatic) else 0,
            "judge_scores": len(judged),
            "human_ratings": len(human),
        },
        details={
            "report": store.uri_of(f"{REPORTS}/{report.name}"),
            "problems": problems,
            "smoke": {
                row["model"]: row["smoke"] for _, row in inputs.metrics.iterrows() if row["smoke"]
            },
        },
    )


def _evaluated_stages(store: RunStore) -> list[Stage]:
    """Every stage whose output the report shows, found by its directory."""
    directories = [
        "splits",
        "rationales",
        "baselines",
        *(f"predictions/{m}" for m in model_names(store)),
    ]
    return [Stage(directory, directory) for directory in directories]


def _inputs_listing(store: RunStore, cfg: EvaluateConfig) -> list[Any]:
    """The files an evaluation reads, by name and size (predictions a user dropped in too),
    and the content of the filled rating sheets."""
    return [
        *store.file_sizes("rationales", suffix=".parquet"),
        *(
            part
            for name in model_names(store)
            for part in store.file_sizes(f"predictions/{name}", suffix=".parquet")
        ),
        *(_file_digest(Path(path)) for path in cfg.human_ratings),
    ]


def _file_digest(path: Path) -> str:
    with path.open("rb") as stream:
        return content_digest(stream)


def _rationale_rows(predictions: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Every prediction row that carries a rationale, with its model's name."""
    frames = [
        table.loc[
            table["rationale"].fillna("").str.strip().astype(bool) & table["error"].isna()
        ].assign(model=name)[["model", "patient_id", "rationale", "diagnosis"]]
        for name, table in predictions.items()
    ]
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["model", "patient_id", "rationale", "diagnosis"])
    return pd.concat(frames, ignore_index=True)


def _helpfulness_reader(store: RunStore) -> HelpfulnessReader | None:
    """The fixed reader: fitted on the training split's teacher rationales only."""
    teacher = read_parts(store, "rationales").to_pandas()
    if teacher.empty:
        return None
    usable = teacher[teacher["error"].isna() & teacher["rationale"].notna()]
    train = (
        store.read_table("splits/train.parquet")
        .select(["patient_id", "description", "label"])
        .to_pandas()
    )
    rows = usable[["patient_id", "rationale"]].merge(train, on="patient_id").dropna()
    if rows["label"].nunique() < 2:
        return None
    return HelpfulnessReader.fit(
        rows["description"].tolist(), rows["rationale"].tolist(), rows["label"].tolist()
    )


@dataclass
class Judged:
    """What the LLM judge produced: absolute scores, pairwise verdicts, its bias controls."""

    scores: pd.DataFrame
    pairwise: pd.DataFrame
    checks: dict[str, float]


def _judge(cfg: EvaluateConfig, rationales: pd.DataFrame, test: pd.DataFrame) -> Judged:
    """Absolute grading of every rationale; with `pairwise`, both orderings of every pair.
    One set of engine actors serves both; the driver only sends conversations to them."""
    if cfg.judge is None or rationales.empty:
        return Judged(pd.DataFrame(columns=[*SCORE_KEYS, "feedback"]), pd.DataFrame(), {})
    if isinstance(cfg.judge.engine, VllmEngineConfig):
        vllm_cfg = cfg.judge.engine
        prepare_model(vllm_cfg.model, dtype=vllm_cfg.dtype)  # once, before the replicas start
    with ActorEngine(cfg.judge.engine) as engine:
        scores = judge_rationales(cfg.judge, rationales, test, engine)
        pairwise = pd.DataFrame()
        if cfg.judge.pairwise:
            pairwise = pairwise_summary(compare_rationales(cfg.judge, rationales, test, engine))
    checks = {"judge verbosity bias (Spearman, score vs words)": verbosity_bias(scores, rationales)}
    if cfg.judge.pairwise:
        checks["judge position consistency (pairwise)"] = float(
            pairwise["position_consistency"].mean()
        )
    return Judged(scores, pairwise, checks)


def _human(
    cfg: EvaluateConfig, rationales: pd.DataFrame, test: pd.DataFrame, out: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Export the blinded sheet; import filled ones (mean score per unit) and their agreement."""
    empty = pd.DataFrame(columns=SCORE_KEYS)
    if rationales.empty:
        return empty, pd.DataFrame()
    items = rating_items(rationales, test, cfg.rating_sheet_per_model)
    _, key, _ = export_rating_sheet(items, out, seed=cfg.seed)
    if not cfg.human_ratings:
        return empty, pd.DataFrame()
    ratings = import_ratings([Path(p) for p in cfg.human_ratings], key)
    ratings.to_csv(out / "ratings_imported.csv", index=False)
    mean = ratings.groupby(["model", "patient_id", "criterion"], as_index=False)["score"].mean()
    return mean.assign(source="human"), inter_rater_agreement(ratings)


def _agreements(
    judged: pd.DataFrame, automatic: pd.DataFrame, human: pd.DataFrame, raters: pd.DataFrame
) -> pd.DataFrame | None:
    """Judge vs automatic measures, judge vs human mean, and between human raters."""
    frames = []
    if len(judged) and len(automatic):
        frames.append(agreement(judged, automatic).assign(pair="judge vs automatic"))
    if len(judged) and len(human):
        frames.append(agreement(judged, human).assign(pair="judge vs human"))
    if len(raters):
        frames.append(raters.assign(pair="between human raters"))
    return pd.concat(frames, ignore_index=True) if frames else None


def _metrics_table(evaluations: dict[str, ModelEvaluation], store: RunStore) -> pd.DataFrame:
    """One row per model, with why it is a smoke test where it is one (`smoke_reason`)."""
    table = pd.DataFrame([e.metrics for e in evaluations.values()])
    if len(table):
        table["smoke"] = [
            smoke_reason(row["n"], _epochs(store, row["model"])) for _, row in table.iterrows()
        ]
    return table


def _epochs(store: RunStore, model: str) -> float | None:
    """Epochs the student `model` trained for, from its distill stage's record; None for
    another model (or a record from before epochs were recorded)."""
    kind = next((k for k in ("text", "vlm") if model == f"student-{k}"), None)
    record = read_record(store, distill_stage(kind)) if kind else None
    if record is None or record.summary is None:
        return None
    return record.summary.details.get("epochs")


def _splits(store: RunStore) -> pd.DataFrame:
    frames = []
    for split in ("train", "val", "test"):
        if store.exists(f"splits/{split}.parquet"):
            columns = ["label", "AGE", "PTGENDER", "MMSE", "APOE4", "Hippocampus", "ICV"]
            table = store.read_table(f"splits/{split}.parquet").select(columns).to_pandas()
            frames.append(table.assign(split=split))
    return pd.concat(frames, ignore_index=True)


def _cohort_summary(store: RunStore) -> pd.DataFrame:
    visits = _splits(store).dropna(subset=["label"])
    grouped = visits.groupby(["split", "label"], sort=False)
    return (
        grouped.agg(
            n=("AGE", "size"),
            age_mean=("AGE", "mean"),
            age_sd=("AGE", "std"),
            female_pct=("PTGENDER", lambda s: 100 * (s == "Female").mean()),
            mmse_mean=("MMSE", "mean"),
            mmse_sd=("MMSE", "std"),
            apoe4_carrier_pct=("APOE4", lambda s: 100 * (s > 0).mean()),
        )
        .reset_index()
        .rename(columns={"label": "group"})
    )


def _cohort_distributions(store: RunStore) -> pd.DataFrame:
    visits = _splits(store)
    visits["hippocampus_icv"] = visits["Hippocampus"] / visits["ICV"]
    return visits[["split", "label", "AGE", "MMSE", "hippocampus_icv"]]


def _examples(
    automatic: pd.DataFrame,
    rationales: pd.DataFrame,
    test: pd.DataFrame,
    truth: pd.Series,
    per_model: int,
) -> list[dict[str, Any]]:
    """The best and worst rationales of each model by their mean automatic score."""
    if automatic.empty or per_model == 0:
        return []
    records = test.set_index("patient_id")
    texts = rationales.set_index(["model", "patient_id"])
    scores = automatic.pivot_table(
        index=["model", "patient_id"], columns="criterion", values="score"
    )
    mean = scores.mean(axis=1).rename("mean").reset_index()
    examples = []
    for model, group in mean.groupby("model"):
        ranked = group.sort_values(["mean", "patient_id"], ascending=[False, True])
        picks = [("best", ranked.head(per_model)), ("worst", ranked.tail(per_model)[::-1])]
        for kind, rows in picks:
            for patient_id in rows["patient_id"]:
                record = records.loc[patient_id]
                examples.append({
                    "model": model, "patient_id": patient_id, "kind": kind,
                    "description": record["description"],
                    "record": {f: _plain(record.get(f)) for f in RECORD_FIELDS},
                    "rationale": texts.loc[(model, patient_id), "rationale"],
                    "diagnosis": texts.loc[(model, patient_id), "diagnosis"],
                    "label": truth.get(patient_id),
                    "scores": {c: int(v) for c, v in scores.loc[(model, patient_id)].dropna().items()},
                })  # fmt: skip
    return examples


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and np.isnan(value) else value


def _counts(
    store: RunStore, manifest: dict[str, Any], evaluations: dict[str, ModelEvaluation]
) -> dict[str, Any]:
    """Quarantined rows, QC flags, unparsed answers and MRI failures, from the run's stages."""
    stages = manifest.get("stages", {})
    teacher = read_parts(store, "rationales")
    counts: dict[str, Any] = {
        "quarantined rows by reason": stages.get("cohort", {}).get("details", {}).get(
            "quarantine_reasons", {}),
        "rationales QC-flagged": int(sum(v for v in teacher["qc_flagged"].to_pylist() if v)),
        "rationales written": teacher.num_rows,
        "unparsed answers by model": {n: e.metrics["unparsed"] for n, e in evaluations.items()},
        "errors by model": {n: e.metrics["errors"] for n, e in evaluations.items()},
    }  # fmt: skip
    for kind in ("text", "vlm"):
        if distilled := stages.get(f"distill-{kind}"):
            counts[f"{kind} student: MRI volumes skipped"] = distilled["counts"].get(
                "mri_failed", 0
            )
    return counts


def _write_tables(
    inputs: ReportInputs,
    evaluations: dict[str, ModelEvaluation],
    judge_tables: dict[str, pd.DataFrame],
    out: Path,
) -> None:
    """Every table as Parquet and CSV, and the headline metrics as JSON."""
    per_class = pd.concat(
        [e.per_class.assign(model=name) for name, e in evaluations.items()], ignore_index=True
    ) if evaluations else pd.DataFrame()  # fmt: skip
    tables = {
        "metrics": inputs.metrics, "per_class": per_class, "paired": inputs.paired,
        "criteria": inputs.criteria, "cohort_summary": inputs.cohort_summary,
        "agreement": inputs.agreement if inputs.agreement is not None else pd.DataFrame(),
        **judge_tables,
    }  # fmt: skip
    for name, table in tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
        table.to_parquet(out / f"{name}.parquet", index=False)
    confusion = {name: e.confusion.to_dict(orient="index") for name, e in evaluations.items()}
    (out / "metrics.json").write_text(
        json.dumps(
            {"models": inputs.metrics.to_dict(orient="records"), "confusion": confusion,
             "problems": inputs.problems},
            indent=2, default=_plain,
        )
    )  # fmt: skip
