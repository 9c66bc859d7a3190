"""Entrypoints for `ray job submit`: each one is a `radiag` command, nothing added.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python -m jobs.<entry> --config configs/adni.yaml [--set key=value ...]

Exit codes are the command's (0 done, 2 a user error such as a failed preflight, 1 a
bug), so `ray job status` says FAILED for both failures; the job log ends with where the
outputs went. A job stopped by `ray job stop` (SIGTERM) ends with 143 and says so: its
finished batches are kept, and the same job submitted again resumes from them.
"""

from __future__ import annotations

import sys

import typer

from radiag.cli import app

STOPPED = {130: "SIGINT", 143: "SIGTERM (`ray job stop`)"}
"""Exit codes of a command stopped by a signal (128 + its number), and what sent it."""


def run_command(name: str) -> None:
    """Run `radiag <name> <argv>` as this job's driver and exit with its code."""
    cli = typer.main.get_group(app).commands[name]
    code = 0
    try:
        cli.main(sys.argv[1:], prog_name=f"python -m jobs.{name}")  # exits with the command's code
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    if code in STOPPED:
        print(
            f"job stopped: radiag {name} ended by {STOPPED[code]} (exit code {code}); its "
            "finished batches are kept, and the same job submitted again resumes from them "
            "without redoing them",
            flush=True,
        )
    else:
        print(f"job finished: radiag {name} exit code {code}", flush=True)
    sys.exit(code)
