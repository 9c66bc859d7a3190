"""Benchmark: the CPU experiment preset, end to end, and its table.

Runs `radiag experiments --config configs/experiments/cpu.yaml` as a user does (a fresh
process), times it, and keeps one entry per table row: the arm's kind, n, balanced
accuracy with its subject-bootstrap CI, and the arm's wall time. Goals (issue:
experiments): the whole preset within 60 minutes on the 2-core machine; every student
arm above chance (the CI's lower bound > 1/3) on >= 150 test visits. Both are checked
here from the table, and the best distilled student's paired differences with the
teacher's few-shot chain-of-thought and with the label-only student are kept, whichever
way they go. The training dtype's one-thread matmul peak is measured before and after
the run: instances of one CPU model differ by up to a fifth in speed, and a time near
the goal is read beside it. A rerun of a finished preset redoes nothing and would time nothing: the
output folder must not hold a finished experiment (`--fresh-output` removes it).
Writes benchmarks/results/experiments_cpu.json.

    python benchmarks/experiments_cpu.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from provenance import ROOT, cpu_and_precision, provenance, run_start
from students import matmul_peak, training_dtype

from radiag.config import load_config
from radiag.evaluation.metrics import paired_difference
from radiag.evaluation.predictions import load_predictions, test_labels
from radiag.experiments.config import ExperimentsConfig
from radiag.store import RunStore

PRESET = ROOT / "configs" / "experiments" / "cpu.yaml"
RESULTS = Path(__file__).parent / "results" / "experiments_cpu.json"
GOAL_SECONDS, CHANCE, GOAL_TEST_VISITS = 60 * 60, 1 / 3, 150
TEACHER, LABEL_ONLY = "teacher-fewshot-cot", "student-label"
ARM_COLUMNS = [
    "name", "kind", "n", "coverage", "balanced_accuracy", "balanced_accuracy_lo",
    "balanced_accuracy_hi", "macro_f1", "mauc", "wall_seconds", "tokens", "smoke",
]  # fmt: skip


def main(
    fresh_output: Annotated[
        bool, typer.Option(help="remove experiments/cpu first, so every stage runs")
    ] = False,
    out: Annotated[Path, typer.Option(help="results file")] = RESULTS,
) -> None:
    cfg = load_config(ExperimentsConfig, PRESET)
    root = ROOT / cfg.root
    if fresh_output:
        shutil.rmtree(root, ignore_errors=True)
    started = run_start()
    dtype = training_dtype()
    peak_before = matmul_peak(1, dtype)
    command = [sys.executable, "-m", "radiag.cli", "experiments", "--config", str(PRESET)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT)
    wall = time.perf_counter() - start
    table = pd.read_parquet(root / "table.parquet")
    arms = json.loads(table.reindex(columns=ARM_COLUMNS).to_json(orient="records"))
    students = table[table["kind"] == "student"]
    report: dict[str, Any] = {
        "preset": str(PRESET.relative_to(ROOT)),
        "exit_code": done.returncode,
        "wall_seconds": round(wall, 1),
        "arm_wall_seconds_sum": round(float(table.drop_duplicates("arm")["wall_seconds"].sum()), 1),
        "goal": {"wall_seconds": GOAL_SECONDS, "test_visits": GOAL_TEST_VISITS},
        "test_visits": int(table["n"].max()),
        "students_above_chance": {
            row["name"]: bool(row["balanced_accuracy_lo"] > CHANCE)
            for _, row in students.iterrows()
        },
        "best_distilled_student": _best_distilled(cfg, students),
        "arms": arms,
        **provenance(started),
    }
    report["machine"] |= cpu_and_precision()
    report["machine"]["matmul_peak_gflops_1_thread"] = {
        "dtype": dtype,
        "before": peak_before,
        "after": matmul_peak(1, dtype),
    }
    report["goal_met"] = bool(
        done.returncode == 0
        and wall <= GOAL_SECONDS
        and report["test_visits"] >= GOAL_TEST_VISITS
        and all(report["students_above_chance"].values())
    )
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("wall_seconds", "goal_met", "students_above_chance")}))


def _best_distilled(cfg: ExperimentsConfig, students: pd.DataFrame) -> dict[str, Any]:
    """The rationale-trained student with the highest balanced accuracy, and its paired
    differences (bootstrap CI over subjects, McNemar) with the teacher and the label-only
    student."""
    distilled = students[students["arm"] != LABEL_ONLY]
    if distilled.empty:
        return {}
    best = distilled.sort_values("balanced_accuracy", ascending=False).iloc[0]
    truth = test_labels(RunStore(cfg.shared_run().run_dir))
    arms = {arm.name: arm for arm in cfg.arms}

    def predictions(name: str) -> pd.DataFrame:
        models, _ = load_predictions(RunStore(cfg.arm_run(arms[name]).run_dir))
        return next(iter(models.values()))

    ours = predictions(best["arm"])
    return {
        "name": best["name"],
        "balanced_accuracy": float(best["balanced_accuracy"]),
        **{
            f"minus_{other}": paired_difference(ours, predictions(other), truth, cfg.bootstrap)
            for other in (TEACHER, LABEL_ONLY)
            if other in arms
        },
    }


if __name__ == "__main__":
    typer.run(main)
