"""`radiag` command line: each command loads a YAML config, applies `--set`
overrides, validates, and calls one stage function. Nothing else lives here."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from radiag.baseline import BaselineConfig, run_baseline
from radiag.cohort.readers import CohortReadError
from radiag.cohort.stages import StageSummary, describe_and_split, ingest, synthetic_mri
from radiag.cohort.synthetic import generate_cohort
from radiag.config import ConfigError, load_config
from radiag.evaluation.stage import EvaluateConfig, run_evaluate
from radiag.models import ModelSpec, prepare_model
from radiag.pipeline import RunConfig, baseline_summary, connect_ray, run_teacher_stage
from radiag.pipeline import run as run_pipeline
from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.students.distill import run_distill
from radiag.students.predict import run_student_diagnose
from radiag.teacher.engines import VllmEngineConfig
from radiag.teacher.stages import DiagnoseConfig, RationalizeConfig

app = typer.Typer(help="Reasoning-aware Alzheimer's diagnosis on Ray.", no_args_is_help=True)
cohort_app = typer.Typer(
    help="Cohort stages: synthesise, ingest, MRI, describe + split.", no_args_is_help=True
)
models_app = typer.Typer(help="Local model directories (no hub at run time).", no_args_is_help=True)
app.add_typer(cohort_app, name="cohort")
app.add_typer(models_app, name="models")
console = Console(stderr=True)

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a field: --set cohort.synthetic.subjects=500"),
]
T = TypeVar("T")


class DiagnosingModel(StrEnum):
    teacher = "teacher"
    text = "text"
    vlm = "vlm"


class StudentChoice(StrEnum):
    text = "text"
    vlm = "vlm"


def _guarded(action: Callable[[], T]) -> T:
    """Run a command body; user errors become one red line and exit code 2, not a traceback."""
    try:
        return action()
    except (ConfigError, CohortReadError, RuntimeError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/] {err}", soft_wrap=True, highlight=False)
        raise typer.Exit(2) from None


def _config(path: Path | None, overrides: list[str] | None) -> RunConfig:
    return _guarded(lambda: load_config(RunConfig, path, overrides))


def _show(summary: StageSummary) -> None:
    table = Table(title=f"stage: {summary.stage}", show_header=False)
    for key, value in summary.counts.items():
        table.add_row(key, str(value))
    console.print(table)
    for error in summary.details.get("mri_errors") or []:
        console.print(f"[yellow]skipped:[/] {error}", soft_wrap=True, highlight=False)
    reasons = summary.details.get("quarantine_reasons")
    if reasons:
        console.print(
            f"[yellow]quarantined rows by reason[/] (details in cohort/quarantine.parquet): {reasons}"
        )


@app.command()
def run(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run the whole pipeline from one config (resumes a killed run)."""
    cfg = _config(config, set_)
    with console.status("starting") as status:
        stages = _guarded(
            lambda: run_pipeline(cfg, on_stage=lambda s: status.update(f"stage: {s}"))
        )
    for summary in stages.values():
        _show(summary)
    console.print(f"[green]done:[/] {RunStore(cfg.run_dir).uri_of('manifest.json')}")
    if "evaluate" in stages:
        _show_report(stages["evaluate"])


@models_app.command("prepare")
def models_prepare(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Convert the teacher's model (bundled GGUF by default) into a local HF directory."""
    cfg = _config(config, set_)
    engine = (cfg.rationalize or RationalizeConfig()).engine
    spec = engine.model if isinstance(engine, VllmEngineConfig) else ModelSpec()
    with console.status("preparing model"):
        path = _guarded(lambda: prepare_model(spec))
    typer.echo(path)


@app.command()
def rationalize(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Module I: the teacher explains each training patient's known diagnosis."""
    _teacher_stage("rationalize", config, set_)


@app.command()
def diagnose(
    model: Annotated[
        DiagnosingModel, typer.Option(help="teacher (few-shot), or a trained student: text, vlm")
    ] = DiagnosingModel.teacher,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Diagnose the test split: the teacher (Module II-1) or a distilled student."""
    if model is DiagnosingModel.teacher:
        _teacher_stage("diagnose", config, set_)
        return
    cfg = _config(config, set_)
    connect_ray(cfg.ray)
    kind = model.value
    _show(
        _guarded(lambda: run_student_diagnose(kind, cfg.students.diagnose, RunStore(cfg.run_dir)))
    )


@app.command()
def distill(
    student: Annotated[StudentChoice, typer.Option(help="text LM, or MRI+text (vlm)")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Module II-2: train a student on the teacher's rationales (Ray Train), export it."""
    cfg = _config(config, set_)
    kind = student.value
    distill_cfg = getattr(cfg.students, kind) or DistillConfig()
    connect_ray(cfg.ray)
    _show(_guarded(lambda: run_distill(kind, distill_cfg, RunStore(cfg.run_dir))))


@app.command()
def baseline(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Classical classifiers (scikit-learn) on the tabular features of the same splits."""
    cfg = _config(config, set_)
    with console.status("fitting baselines"):
        summary = _guarded(
            lambda: run_baseline(cfg.baseline or BaselineConfig(), RunStore(cfg.run_dir))
        )
    _show(baseline_summary(summary))


def _teacher_stage(name: str, config: Path | None, overrides: list[str] | None) -> None:
    cfg = _config(config, overrides)
    stage_cfg = getattr(cfg, name) or (
        RationalizeConfig() if name == "rationalize" else DiagnoseConfig()
    )
    store = RunStore(cfg.run_dir)
    summary = _guarded(lambda: run_teacher_stage(name, stage_cfg, cfg.ray, store))
    console.print(summary.model_dump())


@app.command()
def evaluate(
    run_dir: Annotated[
        str | None, typer.Option("--run", help="run directory or s3:// URI (default: the config's)")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Compare every model that wrote predictions in a run; write reports/ (tables, plots, HTML)."""
    cfg = _config(config, set_)
    store = RunStore(run_dir or cfg.run_dir)
    with console.status("evaluating"):
        summary = _guarded(lambda: run_evaluate(cfg.evaluate or EvaluateConfig(), store))
    _show(summary)
    _show_report(summary)


def _show_report(summary: StageSummary) -> None:
    for problem in summary.details.get("problems") or []:
        console.print(f"[bold red]not evaluated:[/] {problem}", soft_wrap=True, highlight=False)
    console.print(f"[green]report:[/] {summary.details['report']}", soft_wrap=True)


@cohort_app.command("synth")
def cohort_synth(
    out: Annotated[Path, typer.Argument(help="output file: .csv or .parquet (ADNIMERGE-shaped)")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Write a synthetic ADNIMERGE-shaped cohort file (calibrated to published ADNI statistics)."""
    synth = _config(config, set_).cohort.synthetic
    with console.status(f"generating {synth.subjects} subjects"):
        frame = generate_cohort(synth)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False) if out.suffix == ".parquet" else frame.to_csv(
        out, index=False
    )
    console.print(f"[green]wrote[/] {len(frame)} visits of {synth.subjects} subjects to {out}")


@cohort_app.command("ingest")
def cohort_ingest(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Read the configured source into cohort/ (bad rows to cohort/quarantine.parquet)."""
    cfg = _config(config, set_)
    with console.status("ingesting"):
        summary = _guarded(lambda: ingest(cfg.cohort, RunStore(cfg.run_dir)))
    _show(summary)


@cohort_app.command("mri")
def cohort_mri(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Synthesise T1 volumes for `mri.subjects` baseline visits (Ray Data)."""
    cfg = _config(config, set_)
    connect_ray(cfg.ray)
    _show(_guarded(lambda: synthetic_mri(cfg.mri, RunStore(cfg.run_dir))))


@cohort_app.command("split")
def cohort_split(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Describe every visit and split subjects into train / val / test."""
    cfg = _config(config, set_)
    with console.status("describing and splitting"):
        summary = _guarded(
            lambda: describe_and_split(cfg.describe, cfg.split, RunStore(cfg.run_dir))
        )
    _show(summary)


if __name__ == "__main__":
    app()
