"""`radiag run` as a Ray job: the whole pipeline from one config, on a running cluster.

Submit from the repository root (the working dir is uploaded, so `jobs/` and
`configs/` are on the driver's path; radiag itself is already in the cluster image):

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.run --config configs/adni.yaml

Overrides work as on the command line, e.g.
`--set cohort.path=s3://my-bucket/adni/ADNIMERGE.csv`.
"""

from jobs import run_command

if __name__ == "__main__":
    run_command("run")
