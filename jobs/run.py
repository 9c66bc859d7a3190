"""`radiag run` as a Ray job: the whole pipeline from one config, on a running cluster.

Submit from the repository root (the working dir is uploaded, so `jobs/` and
`configs/` are on the driver's path; radiag itself is already in the cluster image):

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.run --config configs/adni.yaml

Overrides work as on the command line, e.g.
`--set cohort.path=s3://my-bucket/adni/ADNIMERGE.csv`. Arguments are parsed by the
`radiag run` command itself (radiag/cli.py); this module adds nothing to it.
"""

from __future__ import annotations

import sys

import typer

from radiag.cli import app

if __name__ == "__main__":
    # The `radiag run` command object itself, so --help shows this module's usage line.
    typer.main.get_group(app).commands["run"].main(sys.argv[1:], prog_name="python -m jobs.run")
