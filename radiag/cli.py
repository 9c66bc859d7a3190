"""`radiag` command line: each command loads a YAML config, applies `--set`
overrides, validates, and calls one stage function. Nothing else lives here.

Exit codes: 0 done; 2 an expected user error (bad config or file, a refused stage
identity, a stage run before its inputs), one red line; 1 anything unexpected, with
its traceback on the console and in the run's log file; 130 stopped by Ctrl-C (128 + the
signal: 143 for SIGTERM) within seconds, with finished batches kept for a rerun to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import pandas as pd
import ray
import typer
from rich.console import Console
from rich.table import Table

from radiag.baseline import BaselineConfig, run_baseline
from radiag.cohort.stages import (
    COHORT_STAGE,
    MRI_STAGE,
    SPLITS_STAGE,
    describe_and_split,
    ingest,
    synthetic_mri,
)
from radiag.cohort.synthetic import generate_cohort
from radiag.config import ConfigError, load_config
from radiag.contract import StageSummary, read_record
from radiag.errors import UserError
from radiag.evaluation.stage import EvaluateConfig, run_evaluate
from radiag.experiments.config import SHARED_STAGES, ExperimentsConfig
from radiag.experiments.report import display_table, write_experiment
from radiag.experiments.runner import run_experiments
from radiag.experiments.table import experiment_tables
from radiag.export import export_dataset, export_student, hub_problem
from radiag.logs import run_logs
from radiag.models import ModelError, ModelSpec, prepare_model
from radiag.pipeline import RayConfig, RunConfig, connect_ray, pipeline_stages
from radiag.pipeline import run as run_pipeline
from radiag.precision import explain, this_machine
from radiag.preflight import preflight, writable
from radiag.store import RunStore
from radiag.students.config import DistillConfig
from radiag.teacher.engines import VllmEngineConfig
from radiag.teacher.imports import batch_file, import_rationales
from radiag.teacher.stages import DiagnoseConfig, RationalizeConfig, teacher_stage
from radiag.transfer import METRIC_HEADER, metric_cells, transfer_config
from radiag.transfer import run as run_transfer

app = typer.Typer(help="Reasoning-aware Alzheimer's diagnosis on Ray.", no_args_is_help=True)
cohort_app = typer.Typer(
    help="Cohort stages: synthesise, ingest, MRI, describe + split.", no_args_is_help=True
)
models_app = typer.Typer(help="Local model directories (no hub at run time).", no_args_is_help=True)
rationales_app = typer.Typer(
    help="Rationales made elsewhere: a Batch API input file, and importing the results.",
    no_args_is_help=True,
)
app.add_typer(cohort_app, name="cohort")
app.add_typer(models_app, name="models")
app.add_typer(rationales_app, name="rationales")
console = Console(stderr=True)
log = logging.getLogger("radiag")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a field: --set cohort.synthetic.subjects=500"),
]
FreshOption = Annotated[
    bool,
    typer.Option(
        "--fresh",
        help="outputs written by another config move to superseded/ instead of being refused",
    ),
]
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="show engine, Ray and library logs on the console")
]


class DiagnosingModel(StrEnum):
    teacher = "teacher"
    text = "text"
    vlm = "vlm"


class StudentChoice(StrEnum):
    text = "text"
    vlm = "vlm"


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(2)


def _warn(line: str) -> None:
    console.print(f"[yellow]waiting:[/] {line}", soft_wrap=True, highlight=False)


def _config(path: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(RunConfig, path, overrides)
    except ConfigError as err:
        raise _fail(str(err)) from None


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 7.0
"""How long a stopping command may wind down (Ray shut down, logs kept) before it is ended
by force: either way it is gone within 10 s of the signal."""


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds the command as Ctrl-C does: `finally` blocks run, Ray is shut down."""
    raise KeyboardInterrupt


def _descendants(pid: int) -> list[int]:
    """Every process `pid` started, and those they started, from /proc (none elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):  # ended meanwhile
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found += (started := children.get(todo.pop(), []))
        todo += started
    return found


def _end_now(signum: int) -> None:
    """Exit at once with every process this one started: a local Ray cluster's raylet, its
    agents and workers and their vLLM engines (a killed raylet leaves its agents running).
    A joined cluster ends this job's actors itself once its driver is gone."""
    for pid in _descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os._exit(128 + signum)


class _SignalWatch:
    """Sees every SIGINT/SIGTERM, whichever Python handler is in place when it comes.

    The handler installed here raises KeyboardInterrupt, but libraries replace it: `ray.init`
    with one for SIGTERM, Ray Train's `fit` with one for SIGINT, kept after training, that
    exits with code 0 during training and after it ignores two Ctrl-Cs out of three. Python
    writes each caught signal's number to the wakeup fd whatever handler then runs, so a
    thread reading it says the command is stopping, ends it by force if it is still there
    STOP_GRACE_S later, and at a second signal at once.
    """

    def __init__(self) -> None:
        self.signum = 0  # the first stop signal; 0 until one comes
        self.seen = threading.Event()
        wakeups, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._handlers = {s: signal.signal(s, _raise_interrupt) for s in STOP_SIGNALS}
        self._wakeup_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(wakeups,), daemon=True).start()

    def close(self) -> None:
        """Put back what was there (a test runner calling commands in-process keeps its own)."""
        signal.set_wakeup_fd(self._wakeup_fd)
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        os.close(self._write)  # the watcher reads the end of the pipe and returns

    def _watch(self, wakeups: int) -> None:
        """Runs on its own thread: the main one may be stuck where the signal found it."""
        with open(wakeups, "rb", buffering=0) as pipe:
            while number := pipe.read(1):
                if number[0] in STOP_SIGNALS:
                    self._stop(number[0])

    def _stop(self, signum: int) -> None:
        """The first stop signal: say so, and set the deadline; a second one: end now."""
        if self.signum:
            _end_now(self.signum)
        self.signum = signum
        signal.alarm(0)  # Ray's C++ crash handler arms an abort 3 s after a SIGTERM: too soon
        console.print(
            "[yellow]interrupted:[/] finished batches are kept; rerun the same command to resume",
            highlight=False,
            soft_wrap=True,
        )
        threading.Timer(STOP_GRACE_S, _end_now, [signum]).start()
        self.seen.set()


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """One SIGINT/SIGTERM stops the command, exit code 128 + the signal (130 for Ctrl-C).

    Finished batches are already whole part files; Ray is shut down, which ends this
    command's actors and their engines (on a joined cluster, this job's, not the cluster).
    """
    watch = _SignalWatch()
    try:
        yield
    except (KeyboardInterrupt, SystemExit):  # how a stop signal reaches here
        if not watch.seen.wait(timeout=1):  # the watcher records a signal in milliseconds
            raise
        ray.shutdown()
        raise typer.Exit(128 + watch.signum) from None
    finally:
        watch.close()


@contextlib.contextmanager
def _session(
    run_dir: str, verbose: bool, ray_cfg: RunConfig | None = None, checks: Iterable[str] = ()
) -> Iterator[RunStore]:
    """A command's run store, with logs to `<run_dir>/logs/`, and errors and stop signals
    mapped to exit codes.

    With `ray_cfg`, the preflight of the stages in `checks` runs before Ray starts, so a
    wrong path or a dead endpoint fails in seconds, before any engine or GPU is reserved.
    """
    if problems := writable(run_dir):  # before its logs go there: a file, no bucket, no S3
        raise _fail(problems[0])
    store = RunStore(run_dir)
    console.print(f"[cyan]precision:[/] {explain(*this_machine())}", highlight=False)
    with _stopped_by_signals(), run_logs(store, verbose) as log_file:
        try:
            if ray_cfg is not None:
                preflight(ray_cfg, checks)
                connect_ray(ray_cfg.ray, log_to_driver=verbose)
            yield store
            console.print(f"[green]outputs:[/] {store.uri}", soft_wrap=True, highlight=False)
        except UserError as err:  # its message says what to do: one red line, exit code 2
            log.error("%s", err)
            raise _fail(str(err)) from None
        except typer.Exit:  # a command's own exit code (click's Exit is a RuntimeError)
            raise
        except Exception:
            log.exception("unexpected error")
            console.print_exception(max_frames=8)
            console.print(f"[bold red]unexpected error[/]; full log: {log_file}", soft_wrap=True)
            raise typer.Exit(1) from None


def _show(summary: StageSummary, seconds: float | None = None) -> None:
    """One line per stage: its name, counts, and what to look at."""
    counts = " ".join(f"{k}={v}" for k, v in summary.counts.items())
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    console.print(f"[green]✓[/] [bold]{summary.stage}[/] {counts}{took}", highlight=False)
    for error in summary.details.get("mri_errors") or []:
        console.print(f"  [yellow]skipped:[/] {error}", soft_wrap=True, highlight=False)
    if reasons := summary.details.get("quarantine_reasons"):
        console.print(
            "  [yellow]quarantined rows by reason[/] (cohort/quarantine.parquet):", highlight=False
        )
        for reason, rows in reasons.items():  # "column: reason"; no markup: "[0, 30]" is text
            console.print(f"    {rows:>6}  {reason}", markup=False, highlight=False, soft_wrap=True)
    for problem in summary.details.get("problems") or []:
        console.print(f"  [bold red]not evaluated:[/] {problem}", soft_wrap=True, highlight=False)
    for model, reason in (summary.details.get("smoke") or {}).items():
        console.print(
            f"  [yellow]smoke run:[/] {model}: {reason}; see `radiag experiments`", highlight=False
        )
    if report := summary.details.get("report"):
        console.print(f"[green]report:[/] {report}", soft_wrap=True, highlight=False)


def _stage(action: Callable[[], StageSummary], label: str) -> None:
    """Run one stage with a spinner and print its line."""
    start = time.perf_counter()
    with console.status(label):
        summary = action()
    _show(summary, time.perf_counter() - start)


COHORT_STAGES = {"cohort": COHORT_STAGE, "mri": MRI_STAGE, "splits": SPLITS_STAGE}
"""What every later stage reads; a stage command on a new run runs them first."""


def _cohort_first(cfg: RunConfig, store: RunStore) -> None:
    """The cohort stages this run has not finished, run first, each saying so: a stage
    command (or job) on a new run directory then works on its own. Finished ones are
    left alone; the later stages' own inputs (rationales for a student) are not run."""
    for name, stage in pipeline_stages(cfg):
        if name not in COHORT_STAGES:
            continue
        record = read_record(store, COHORT_STAGES[name])
        if record is not None and record.status == "complete":
            continue
        console.print(f"[cyan]first:[/] stage {name} has not run in this run yet", highlight=False)
        if name == "mri":
            connect_ray(cfg.ray)  # the T1 volumes are made with Ray Data
        _show(stage(store, False))


@app.command()
def run(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Run the whole pipeline from one config (resumes a killed run)."""
    cfg = _config(config, set_)
    checks = [name for name, _ in pipeline_stages(cfg)]
    with (
        _session(cfg.run_dir, verbose, cfg, checks) as store,
        console.status("starting") as status,
    ):
        run_pipeline(
            cfg,
            fresh=fresh,
            on_stage=lambda name: status.update(f"stage: {name}"),
            on_done=_show,
        )
        console.print(f"[green]done:[/] {store.uri_of('manifest.json')}", highlight=False)


@app.command()
def serve(
    run_dir: Annotated[str, typer.Option("--run", help="the run whose models to serve")],
    config: ConfigOption = None, set_: SetOption = None,
    teacher: Annotated[bool, typer.Option(help="also serve the teacher LLM (vLLM, ~7 GiB on CPU)")] = False,
    host: Annotated[str, typer.Option(help="address the HTTP proxy listens on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port of the HTTP proxy")] = 8000,
    address: Annotated[str | None, typer.Option(help="Ray address (default: $RAY_ADDRESS or a local Ray)")] = None,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Serve a run's models (one Ray Serve app) until Ctrl-C; the token comes from
    $RADIAG_SERVE_TOKEN (or `token_file` in the config)."""
    from radiag.serving.app import ConfigurationError, check_servable, deploy, read_token
    from radiag.serving.config import ServeConfig, TeacherServeConfig

    try:
        cfg = load_config(ServeConfig, config, [*(set_ or []), f"run_dir={run_dir}"])
    except ConfigError as err:
        raise _fail(str(err)) from None
    if teacher and cfg.teacher is None:
        cfg = cfg.model_copy(update={"teacher": TeacherServeConfig()})
    try:  # before Ray starts: a missing secret or a run it cannot serve fails in a second
        read_token(cfg)
        check_servable(cfg)
    except (ConfigurationError, OSError) as err:
        raise _fail(str(err)) from None
    with _session(run_dir, verbose):
        connect_ray(RayConfig(address=address), log_to_driver=verbose)
        try:
            with console.status("deploying (a teacher replica takes about a minute on CPU)"):
                url = deploy(cfg, host, port, on_wait=_warn)
        except (ConfigurationError, FileNotFoundError, TimeoutError) as err:
            raise _fail(str(err)) from None
        console.print(f"[green]serving:[/] {url}  (Ctrl-C stops)", highlight=False)
        while True:
            time.sleep(3600)


@models_app.command("prepare")
def models_prepare(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Convert the teacher's model (bundled GGUF by default) into a local HF directory."""
    cfg = _config(config, set_)
    engine = (cfg.rationalize or RationalizeConfig()).engine
    spec = engine.model if isinstance(engine, VllmEngineConfig) else ModelSpec()
    with console.status("preparing model"):
        try:
            path = prepare_model(spec)
        except ModelError as err:
            raise _fail(str(err)) from None
    typer.echo(path)


@app.command()
def rationalize(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Module I: the teacher explains each training patient's known diagnosis."""
    cfg = _config(config, set_)
    stage_cfg = cfg.rationalize or RationalizeConfig()
    with _session(cfg.run_dir, verbose, cfg, ["rationalize"]) as store:
        _cohort_first(cfg, store)
        _show(teacher_stage("rationalize", stage_cfg, store, fresh))


@app.command()
def diagnose(
    model: Annotated[
        DiagnosingModel, typer.Option(help="teacher (few-shot), or a trained student: text, vlm")
    ] = DiagnosingModel.teacher,
    config: ConfigOption = None,
    set_: SetOption = None,
    fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Diagnose the test split: the teacher (Module II-1) or a distilled student."""
    cfg = _config(config, set_)
    checks = ["diagnose"] if model is DiagnosingModel.teacher else []
    with _session(cfg.run_dir, verbose, cfg, checks) as store:
        if model is DiagnosingModel.teacher:
            _cohort_first(cfg, store)
            _show(teacher_stage("diagnose", cfg.diagnose or DiagnoseConfig(), store, fresh))
        else:
            from radiag.students.predict import run_student_diagnose  # torch, for students only

            kind = model.value
            _stage(
                lambda: run_student_diagnose(kind, cfg.students.diagnose, store, fresh),
                f"student {kind} diagnosing",
            )


@app.command()
def distill(
    student: Annotated[StudentChoice, typer.Option(help="text LM, or MRI+text (vlm)")],
    config: ConfigOption = None,
    set_: SetOption = None,
    fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Module II-2: train a student on the teacher's rationales (Ray Train), export it."""
    cfg = _config(config, set_)
    kind = student.value
    distill_cfg = getattr(cfg.students, kind) or DistillConfig()
    from radiag.students.distill import run_distill  # torch: only where a student trains

    with _session(cfg.run_dir, verbose, cfg, [f"distill-{kind}"]) as store:
        _cohort_first(cfg, store)
        _stage(lambda: run_distill(kind, distill_cfg, store, fresh), f"training the {kind} student")


@app.command()
def baseline(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Classical classifiers (scikit-learn) on the tabular features of the same splits."""
    cfg = _config(config, set_)
    with _session(cfg.run_dir, verbose) as store:
        _cohort_first(cfg, store)
        _stage(lambda: run_baseline(cfg.baseline or BaselineConfig(), store, fresh), "baselines")


@app.command()
def evaluate(
    run_dir: Annotated[
        str | None, typer.Option("--run", help="run directory or s3:// URI (default: the config's)")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Compare every model that wrote predictions in a run; write reports/ (tables, plots, HTML).

    Without `--config`, the config is the one the run's manifest recorded (with the
    `--set` overrides), so the judge and the other settings of the run are kept.
    """
    if run_dir is not None and config is None:
        cfg = _config_of_run(run_dir, set_)
    else:
        cfg = _config(config, set_)
    with _session(run_dir or cfg.run_dir, verbose, cfg, ["evaluate"]) as store:
        evaluate_cfg = cfg.evaluate or EvaluateConfig()
        _stage(lambda: run_evaluate(evaluate_cfg, store, fresh), "evaluating")


@app.command()
def experiments(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """The paper's questions in one command: the shared stages once, every arm of the config
    under the stage contract, then the table, the paired comparisons with the reference arm
    and report.html in <output_dir>/<name>/ (reruns and killed runs redo nothing finished)."""
    try:
        cfg = load_config(ExperimentsConfig, config, set_)
    except ConfigError as err:
        raise _fail(str(err)) from None
    shared = cfg.shared_run()
    with (
        _session(cfg.root, verbose, shared, [n for n, _ in pipeline_stages(shared)]) as store,
        console.status("starting") as status,
    ):
        for arm in cfg.arms:
            arm_run = cfg.arm_run(arm)
            preflight(arm_run, [n for n, _ in pipeline_stages(arm_run) if n not in SHARED_STAGES])
        run_experiments(
            cfg, fresh, on_stage=lambda name: status.update(f"stage: {name}"), on_done=_show
        )
        status.update("table and report")
        table, comparisons, problems = experiment_tables(cfg)
        report = write_experiment(cfg, table, comparisons, problems)
        _show_experiment(display_table(table), problems)
        console.print(f"[green]report:[/] {report}", soft_wrap=True, highlight=False)
        console.print(f"[green]table:[/] {store.uri_of('table.csv')}", highlight=False)


def _show_experiment(shown: pd.DataFrame, problems: list[str]) -> None:
    """The experiment's table, smoke rows called so, and the arms missing from it."""
    table = Table(*shown.columns[:-1], title="arms on the shared test split (95% CI)")
    for row in shown.itertuples(index=False):
        table.add_row(*map(str, row[:-1]))
    console.print(table)
    for name, smoke in zip(shown.iloc[:, 0], shown.iloc[:, -1], strict=True):
        if smoke:
            console.print(f"  [yellow]smoke run:[/] {name}: {smoke}", highlight=False)
    for problem in problems:
        console.print(f"  [bold red]not in the table:[/] {problem}", soft_wrap=True)


@app.command()
def export(
    run_dir: Annotated[str, typer.Option("--run", help="the run whose data set is exported")],
    to: Annotated[str, typer.Option(help="a local folder or an s3:// prefix")],
    include_descriptions: Annotated[bool, typer.Option(
        help="a non-synthetic cohort's descriptions too (they restate the records)")] = False,
    student: Annotated[StudentChoice | None, typer.Option(
        help="export this trained student with a model card instead of the data set")] = None,
    push_to_hub: Annotated[str | None, typer.Option(
        "--push-to-hub", help="also upload it to this private Hugging Face Hub repository "
        "(owner/name; token: HF_TOKEN)")] = None,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """The augmented data set as Hugging Face datasets (Parquet splits and a DatasetDict),
    chat-format JSONL and a dataset card; what a data-use agreement keeps out is named.
    With --student, that student (merged LM, adapter, MRI prefix) and its model card."""
    if push_to_hub and (problem := hub_problem(push_to_hub)):
        raise _fail(problem)
    if problems := writable(to):
        raise _fail(problems[0].replace("run_dir", "--to", 1))
    with _session(run_dir, verbose) as store, console.status("exporting"):
        if student is not None:
            uri, hub_url = export_student(store, student.value, to, push_to_hub)
            _said_exported(f"the {student.value} student to {uri}", hub_url)
            return
        exported = export_dataset(store, to, include_descriptions, push_to_hub)
    rows = ", ".join(f"{name} {n}" for name, n in exported.rows.items())
    _said_exported(f"{exported.uri} ({rows}; chat {exported.chat_rows})", exported.hub_url)
    for line in exported.left_out:
        console.print(f"  [yellow]left out:[/] {line}", soft_wrap=True, highlight=False)


def _said_exported(what: str, hub_url: str | None) -> None:
    console.print(f"[green]exported:[/] {what}", soft_wrap=True, highlight=False)
    if hub_url:
        console.print(f"  [green]pushed:[/] {hub_url} (private)", soft_wrap=True, highlight=False)


@app.command()
def transfer(
    source: Annotated[str, typer.Option("--from", help="the trained run whose models are carried over")],
    cohort: Annotated[Path, typer.Option(help="YAML of the other cohort: an ingest config (source, path, mapping)")],
    run_dir: Annotated[str, typer.Option("--run", help="the external run: a directory of its own")],
    set_: SetOption = None, fresh: FreshOption = False, verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Cross-cohort evaluation: every model of a trained run diagnoses another cohort; the
    report sets in-distribution and external metrics side by side (reports/transfer/)."""
    try:
        cfg = transfer_config(source, cohort, run_dir, set_)
    except ConfigError as err:
        raise _fail(str(err)) from None
    run_cfg = cfg.run_config()
    checks = ["cohort", *(["diagnose"] if run_cfg.diagnose else [])]
    with (
        _session(cfg.run_dir, verbose, run_cfg, checks),
        console.status("starting") as status,
    ):
        done = run_transfer(
            cfg, fresh, on_stage=lambda name: status.update(f"stage: {name}"), on_done=_show
        )
        _show_transfer(done["transfer-report"].details)


def _show_transfer(report: dict) -> None:
    """The transfer report's table, which norm graded the MRI, and what was refitted."""
    table = Table(*METRIC_HEADER, title="in-distribution vs external (95% CI)")
    for row in report["metrics"]:
        table.add_row(*metric_cells(row))
    console.print(table)
    norm = report["norm"]
    for line in [
        f"MRI graded by the {norm['kind']} norm {norm['describe.norm']}",
        *report["notes"],
    ]:
        console.print(f"  [yellow]note:[/] {line}", soft_wrap=True, highlight=False)


def _config_of_run(run_dir: str, overrides: list[str] | None) -> RunConfig:
    """The config a run's manifest recorded, with `overrides`; defaults if it has none."""
    store = RunStore(run_dir)
    recorded = (
        store.read_json("manifest.json").get("config", {}) if store.exists("manifest.json") else {}
    )
    try:
        return load_config(RunConfig, overrides=overrides, base=recorded)
    except ConfigError as err:
        raise _fail(str(err)) from None


@rationales_app.command("import")
def rationales_import(
    file: Annotated[Path, typer.Argument(help="Parquet or JSONL (patient_id, rationale[, "
                                         "diagnosis, model]) or an OpenAI Batch API output")],
    run_dir: Annotated[str, typer.Option("--run", help="the run whose training split it explains")],
    fresh: FreshOption = False, verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Bring rationales made elsewhere into a run as its rationalize stage: refused rows are
    named by file, line and patient; QC runs on the rest as on generated ones."""
    with _session(run_dir, verbose) as store:
        summary = import_rationales(store, file, fresh)
        _show(summary)
        for line in summary.details.get("refused") or []:
            console.print(f"  [yellow]refused:[/] {line}", soft_wrap=True, highlight=False)


@rationales_app.command("batch-file")
def rationales_batch_file(
    run_dir: Annotated[str, typer.Option("--run", help="the run whose training split to explain")],
    model: Annotated[str, typer.Option(help="the hosted model the Batch API runs")],
    out: Annotated[Path, typer.Option(help="the JSONL file to write")] = Path("batch-input.jsonl"),
    max_tokens: Annotated[int, typer.Option(help="per rationale")] = 512,
) -> None:  # fmt: skip
    """Write an OpenAI Batch API input file: one chat request per labelled training patient
    (custom_id = patient id), the messages the rationalize stage sends."""
    with _session(run_dir, False) as store:
        requests = batch_file(store, model, max_tokens)
        out.write_text("".join(json.dumps(r) + "\n" for r in requests))
    console.print(f"[green]wrote[/] {len(requests)} requests to {out}", highlight=False)


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
    if out.suffix == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)
    console.print(f"[green]wrote[/] {len(frame)} visits of {synth.subjects} subjects to {out}")


@cohort_app.command("ingest")
def cohort_ingest(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Read the configured source into cohort/ (bad rows to cohort/quarantine.parquet)."""
    cfg = _config(config, set_)
    with _session(cfg.run_dir, verbose) as store:
        _stage(lambda: ingest(cfg.cohort, store, fresh), "ingesting")


@cohort_app.command("mri")
def cohort_mri(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Synthesise T1 volumes for `mri.subjects` baseline visits (Ray Data)."""
    cfg = _config(config, set_)
    with _session(cfg.run_dir, verbose, cfg) as store:
        _stage(lambda: synthetic_mri(cfg.mri, store, fresh), "synthesising T1 volumes")


@cohort_app.command("split")
def cohort_split(
    config: ConfigOption = None, set_: SetOption = None, fresh: FreshOption = False,
    verbose: VerboseOption = False,
) -> None:  # fmt: skip
    """Describe every visit and split subjects into train / val / test."""
    cfg = _config(config, set_)
    with _session(cfg.run_dir, verbose) as store:
        _stage(
            lambda: describe_and_split(cfg.describe, cfg.split, store, fresh),
            "describing and splitting",
        )


if __name__ == "__main__":
    app()
