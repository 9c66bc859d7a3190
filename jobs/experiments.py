"""`radiag experiments` as a Ray job: every arm of an experiment config on a running cluster.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python -m jobs.experiments --config configs/experiments/cluster.yaml

The experiment's folder (`output_dir`) must be one every node reaches: s3:// on a cluster.
"""

from jobs import run_command

if __name__ == "__main__":
    run_command("experiments")
