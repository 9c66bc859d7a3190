"""Where logs go: a quiet console by default, everything in `<run_dir>/logs/`.

vLLM, Ray, Ray Data, Ray Train and transformers log hundreds of INFO lines per
stage. By default the console gets the CLI's line per stage and the libraries'
errors; the driver's full log goes to `<run_dir>/logs/radiag.log`, and Ray's logs of
this command (every worker, engine and actor of it; never another job's) are copied to
`<run_dir>/logs/ray/` when the command ends. `verbose` shows it all on the console as well.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import ray
import ray.data  # attaches Ray Data's log handlers, which are quietened below

from radiag.store import RunStore

LOGS = "logs"
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""A submitted job's config, which Ray's job supervisor puts in the driver's environment."""
NOISY_LOGGERS = ("ray", "vllm", "transformers", "deepspeed", "torch", "urllib3", "filelock")

# Set before the libraries are imported by a stage: they read these once.
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}


@contextlib.contextmanager
def run_logs(store: RunStore, verbose: bool = False) -> Iterator[Path]:
    """Send this process's logs to the run's log file; yields the local log file path.

    A local run writes `<run_dir>/logs/radiag.log` directly; an S3 run writes a local
    file that is uploaded, with the Ray session logs, when the block ends.
    """
    local_dir = Path(store.root) / LOGS if store.uri == store.root else Path(tempfile.mkdtemp())
    local_dir.mkdir(parents=True, exist_ok=True)
    log_file = local_dir / "radiag.log"
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    own_ray_session = not ray.is_initialized()  # Ray started by this command, not before it
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    _quiet_console(verbose)
    try:
        yield log_file
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved_level)
        if own_ray_session:
            _keep_ray_logs(local_dir)
        if store.uri != store.root:
            store.upload_dir(local_dir, LOGS)


def _quiet_console(verbose: bool) -> None:
    """Libraries' own console handlers show errors only (all of it with `verbose`).

    Ray Data attaches its handlers when it is imported (above), so they exist by now.
    """
    if not verbose:  # the flags above are read at import; these switch off what is loaded
        import huggingface_hub.utils
        import transformers

        huggingface_hub.utils.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    level = logging.INFO if verbose else logging.ERROR
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in NOISY_LOGGERS]
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(level)


def _keep_ray_logs(local_dir: Path) -> None:
    """Copy Ray's logs of this command next to the driver log, in `ray/`.

    On a cluster this command started, the session is its own: every file. On a cluster it
    joined (a Ray job, `ray.address`), only this job's files: its workers' and actors' logs
    (named after its job id) and, for a submitted job, its driver log; from every node when
    the cluster has a dashboard (Ray's log API), else from this node's folder. Other jobs'
    logs, which may name other runs' patients, never enter this run.
    """
    if not ray.is_initialized():  # the command never needed Ray
        return
    node = getattr(ray._private.worker, "_global_node", None)  # the driver's own node
    if node is None:
        return
    source, target = Path(node.get_logs_dir_path()), local_dir / "ray"
    if node.head:  # started by this command
        _copy_files(source, source.rglob("*"), target)
        return
    patterns = this_jobs_log_patterns()
    try:
        _download_from_every_node(patterns, target)
    except Exception as err:  # the log API needs the cluster's dashboard
        logging.getLogger(__name__).info("Ray's log API unreachable (%s): this node's logs", err)
        found = {path for pattern in patterns for path in source.glob(pattern)}
        _copy_files(source, found, target)


def this_jobs_log_patterns() -> list[str]:
    """Globs of the log files of this driver's job: its workers and actors (Ray names them
    `worker-<worker id>-<job id>-<pid>.out|err`) and a submitted job's driver log."""
    patterns = [f"worker-*-{ray.get_runtime_context().get_job_id()}-*"]
    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV, "{}"))
    if submission := job_config.get("metadata", {}).get("job_submission_id"):
        patterns.append(f"job-driver-{submission}.log")
    return patterns


def _copy_files(source: Path, paths: Iterable[Path], target: Path) -> None:
    for path in paths:
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                destination.write_bytes(path.read_bytes())


def _download_from_every_node(patterns: list[str], target: Path) -> None:
    """This job's log files from every alive node through Ray's log API, each node's into
    `ray/<node ip>/`."""
    from ray.util.state import get_log, list_logs

    for node in ray.nodes():
        if not node["Alive"]:
            continue
        folder = target / node["NodeManagerAddress"]
        for pattern in patterns:
            listed = list_logs(node_id=node["NodeID"], glob_filter=pattern)
            for filename in {name for names in listed.values() for name in names}:
                chunks = get_log(filename=filename, node_id=node["NodeID"], encoding=None)
                folder.mkdir(parents=True, exist_ok=True)
                (folder / Path(filename).name).write_bytes(b"".join(chunks))
