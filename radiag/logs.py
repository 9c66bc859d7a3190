"""Where logs go: a quiet console by default, everything in `<run_dir>/logs/`.

vLLM, Ray, Ray Data, Ray Train and transformers log hundreds of INFO lines per
stage. By default the console gets the CLI's line per stage and the libraries'
errors; the driver's full log goes to `<run_dir>/logs/radiag.log`, and the Ray
session's logs (every worker, engine and actor) are copied to `<run_dir>/logs/ray/`
when the command ends. `verbose` shows it all on the console as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.data  # attaches Ray Data's log handlers, which are quietened below

from radiag.store import RunStore

LOGS = "logs"
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
    """Copy the Ray session's log folder (workers, engines, actors) next to the driver log."""
    if not ray.is_initialized():  # the command never needed Ray
        return
    node = getattr(ray._private.worker, "_global_node", None)  # the driver's own node
    if node is None:
        return
    source = Path(node.get_logs_dir_path())
    target = local_dir / "ray"
    for path in source.rglob("*"):
        if path.is_file():
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                destination.write_bytes(path.read_bytes())
