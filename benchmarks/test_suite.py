"""Benchmark: how long the test suite takes, whole and without the `slow` tier.

Goal (issue: any machine): the whole suite (`pytest -n 2`, what `make test` runs after
ruff) within 25 minutes on the 2-core machine, and `-m "not slow"` within 8 minutes.
Both run here one after the other, each in a fresh pytest process; the 25 slowest tests of
the whole run are kept. The CPU (model, bf16 flags, the precision it resolves) is recorded
with them: a CPU without native bf16 runs the suite's models in fp32 at another speed.
Writes benchmarks/results/test_suite.json.

    python benchmarks/test_suite.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from provenance import ROOT, cpu_and_precision, provenance, run_start

RESULTS = Path(__file__).parent / "results" / "test_suite.json"
GOAL_SECONDS, GOAL_NOT_SLOW_SECONDS = 25 * 60, 8 * 60
SLOWEST = 25
WORKERS = ("-n", "2")  # as `make test`
DURATION = re.compile(r"^(\d+\.\d+)s (call|setup|teardown)\s+(\S+)$")
SUMMARY = re.compile(r"^=+ (.*) in ([\d.]+)s")


def run_pytest(*args: str) -> dict[str, Any]:
    """One pytest process: its wall time, its closing line and its slowest test phases."""
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *WORKERS,
               f"--durations={SLOWEST}", "-rfE", *args]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = done.stdout.splitlines()
    slowest = [
        {"seconds": float(m[1]), "phase": m[2], "test": m[3]}
        for line in lines
        if (m := DURATION.match(line.strip()))
    ]
    closing = next((m for line in reversed(lines) if (m := SUMMARY.match(line.strip()))), None)
    return {
        "args": list(args),
        "exit_code": done.returncode,
        "outcome": closing[1] if closing else done.stdout[-500:],
        "pytest_seconds": float(closing[2]) if closing else None,
        "wall_seconds": round(seconds, 1),
        "slowest": slowest,
        "failed": [line for line in lines if line.startswith(("FAILED ", "ERROR "))],
    }


def main(out: Annotated[Path, typer.Option(help="results file")] = RESULTS) -> None:
    started = run_start()
    whole = run_pytest()
    not_slow = run_pytest("-m", "not slow")
    report = {
        "goal": {"pytest_seconds": GOAL_SECONDS, "slow_deselected_seconds": GOAL_NOT_SLOW_SECONDS},
        "pytest_seconds": whole["pytest_seconds"],
        "slow_deselected_seconds": not_slow["pytest_seconds"],
        "goal_met": bool(
            whole["exit_code"] == 0
            and not_slow["exit_code"] == 0
            and whole["pytest_seconds"] <= GOAL_SECONDS
            and not_slow["pytest_seconds"] <= GOAL_NOT_SLOW_SECONDS
        ),
        "whole": whole,
        "not_slow": not_slow,
        **provenance(started),
    }
    report["machine"] |= cpu_and_precision()
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("pytest_seconds", "slow_deselected_seconds",
                                              "goal_met")}))  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
