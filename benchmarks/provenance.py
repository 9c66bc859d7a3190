"""What a benchmark's results file records about how it was made, so a figure can be traced.

A benchmark takes `run_start()` when it starts and, when it ends, stores `provenance(that)`:

    started = run_start()
    ...  # measure
    report |= provenance(started)
    write_results(path, report)  # with the CPU and its precision

The commit recorded is the one checked out when the run started, the code it ran: a commit
made during a 45-minute run is named apart (`git_commit_at_end`), and edits not committed
at the start are listed (`uncommitted_changes`). `git_commit()` and `machine()` are also
there on their own (serving.py stamps each section).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """`git rev-parse HEAD`, read from .git (no git process)."""
    git = ROOT / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


def uncommitted_changes(root: Path = ROOT) -> list[str] | None:
    """Tracked files under `root` whose edits are not committed, results files and Markdown
    aside (a run writes those), or None where git or the repository is not at hand (the GPU
    machine gets a copy without .git)."""
    command = ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
               ".", ":(exclude)benchmarks/results", ":(exclude)*.md"]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line[3:] for line in done.stdout.splitlines()]


def load_1min() -> float:
    """The 1-minute load average now: on a shared 2-core machine it says how noisy a run was."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    """Cores, platform, Python, memory and the Ray version (None where Ray is not installed)."""
    try:
        ray = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        ray = None
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "ray": ray,
    }


def utc_timestamp() -> str:
    """Now, in UTC to the second (ISO 8601): every results file dates its figures this way."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RunStart:
    """What a benchmark notes as it starts: the code it is about to run, and the load."""

    git_commit: str | None
    uncommitted_changes: list[str] | None
    load_1min: float


def run_start() -> RunStart:
    return RunStart(git_commit(), uncommitted_changes(), load_1min())


def provenance(started: RunStart) -> dict[str, Any]:
    """The exact command line, the commit and uncommitted edits the run started on, the
    date (UTC, now: when the figures were finished) and the machine, with the 1-minute load
    average at the start and now, at the end. `git_commit_at_end` only where HEAD moved
    during the run.

    Returns:
        {"command": str, "git_commit": str | None, "uncommitted_changes": [path] | None,
        "date": "YYYY-MM-DDTHH:MM:SS+00:00", "machine": {..., "load_1min": {"start", "end"}}}
    """
    at_end = git_commit()
    return {
        "command": shlex.join([sys.executable, *sys.argv]),
        "git_commit": started.git_commit,
        **({"git_commit_at_end": at_end} if at_end != started.git_commit else {}),
        "uncommitted_changes": started.uncommitted_changes,
        "date": utc_timestamp(),
        "machine": machine() | {"load_1min": {"start": started.load_1min, "end": load_1min()}},
    }


def cpu_and_precision() -> dict[str, Any]:
    """The CPU model, its bf16 and AVX flags and the precision `auto` resolves to on it: a
    CPU without native bf16 runs the models in fp32, at another speed."""
    from radiag.precision import NATIVE_BF16_FLAGS, explain, this_cpu, this_machine

    cpu = this_cpu()
    return {
        "cpu_model": cpu.name,
        "native_bf16_flags": sorted(cpu.cpu_flags & NATIVE_BF16_FLAGS),
        "avx2": "avx2" in cpu.cpu_flags,
        "avx512f": "avx512f" in cpu.cpu_flags,
        "precision": explain(*this_machine()),
    }


def write_results(path: Path, report: dict[str, Any]) -> None:
    """Add the CPU and its precision to the report's machine, write it as indented JSON to
    `path` and print it."""
    report["machine"] |= cpu_and_precision()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
