"""Preflight: what a run needs from outside, checked before any engine or GPU is reserved.

A cluster job that fails an hour in, on a bucket name typo, wastes the hour and the GPUs.
`preflight(cfg, stages)` checks, for the stages about to run: the run directory can be
written (on S3: the bucket exists and the credentials work; in a Ray job: it is not a
relative local path, which would land in Ray's temporary copy of the working dir), every
input file and folder exists and can be read, a column mapping validates, every model
directory holds a loadable config (or its GGUF / bundling package exists, and the model
cache it is converted into can be written), and every OpenAI-compatible endpoint answers
`/models` with its key. All problems are reported together, one line each.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable

import pyarrow.fs as pafs

from radiag.cohort.mapping import load_mapping
from radiag.config import ConfigError
from radiag.errors import UserError
from radiag.logs import RAY_JOB_CONFIG_ENV
from radiag.models import ModelError, ModelSpec, bundled_file, model_cache_dir
from radiag.pipeline import RunConfig
from radiag.store import filesystem_for
from radiag.teacher.engines import OpenAIEngineConfig, VllmEngineConfig

ENDPOINT_TIMEOUT_S = 5.0


class PreflightError(UserError, RuntimeError):
    """One line per problem found; the message is user-facing."""


def preflight(cfg: RunConfig, stages: Iterable[str] | None = None) -> None:
    """Check what `stages` (default: every stage `cfg` enables) read and write.

    Stage names are those of `radiag.pipeline.pipeline_stages`: cohort, mri, splits,
    rationalize, diagnose, baseline, distill-text, distill-vlm, diagnose-student-text,
    diagnose-student-vlm, evaluate.

    Raises:
        PreflightError: listing every problem found.
    """
    wanted = set(stages) if stages is not None else None

    def runs(name: str) -> bool:
        return wanted is None or name in wanted

    problems = [*writable(cfg.run_dir)]
    if runs("cohort"):
        unread = [p for path in (cfg.cohort.path, cfg.cohort.mapping) if path
                  for p in readable(path)]  # fmt: skip
        problems += unread
        if cfg.cohort.mapping and not unread:
            problems += mapping_problems(cfg.cohort.mapping)
    engines = [
        (name, section.engine)
        for name, section in (("rationalize", cfg.rationalize), ("diagnose", cfg.diagnose))
        if section is not None and runs(name)
    ]
    if cfg.evaluate is not None and cfg.evaluate.judge is not None and runs("evaluate"):
        engines.append(("evaluate.judge", cfg.evaluate.judge.engine))
    models: list[ModelSpec] = []
    for name, engine in engines:
        if isinstance(engine, OpenAIEngineConfig):
            problems += [f"{name}: {p}" for p in endpoint_answers(engine)]
        elif isinstance(engine, VllmEngineConfig):
            problems += [f"{name}: {p}" for p in model_loadable(engine.model)]
            models.append(engine.model)
    for kind in ("text", "vlm"):
        student = getattr(cfg.students, kind)
        if student is not None and runs(f"distill-{kind}"):
            problems += [f"students.{kind}: {p}" for p in model_loadable(student.model)]
            models.append(student.model)
    if any(spec.path is None for spec in models):  # a GGUF or bundled model is converted
        problems += model_cache_writable()
    if problems:
        raise PreflightError("preflight found problems:\n  " + "\n  ".join(problems))


def writable(uri: str) -> list[str]:
    """A run directory we can create and write a file in (removed again), and that outlives
    the command: a Ray job runs in a copy of its working dir that Ray deletes later."""
    if RAY_JOB_CONFIG_ENV in os.environ and "://" not in uri and not os.path.isabs(uri):
        return [
            f"run_dir {uri}: a relative path in a Ray job would write the run into Ray's "
            f"temporary copy of the working dir ({os.getcwd()}), which Ray deletes later; "
            "give an absolute path that the job's nodes share, or an s3:// URI"
        ]
    try:
        fs, path = filesystem_for(uri)
        if uri.startswith("s3://"):
            bucket = path.split("/", 1)[0]
            if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                return [f"run_dir {uri}: bucket {bucket!r} does not exist"]
        probe = f"{path}/.preflight-{uuid.uuid4().hex}"
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        return [f"run_dir {uri}: cannot write there ({_short(err)})"]
    return []


def model_cache_writable() -> list[str]:
    """The folder GGUF and bundled models are converted into can be created and written."""
    cache = model_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".preflight-"):
            pass
    except OSError as err:
        return [
            f"model cache {cache} (RADIAG_MODEL_CACHE): cannot write there ({_short(err)}); "
            "set RADIAG_MODEL_CACHE to a folder this user can write (on a cluster: one "
            "every node mounts, so a model is converted once)"
        ]
    return []


def mapping_problems(path: str) -> list[str]:
    """A column-mapping YAML that does not validate: its file and every bad field named
    (an expression that is not arithmetic is refused here, long before any row is read)."""
    try:
        load_mapping(path)
    except ConfigError as err:
        return [f"cohort.mapping: {err}"]
    return []


def readable(uri: str) -> list[str]:
    """An input file or folder that exists and can be opened."""
    try:
        fs, path = filesystem_for(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            return [f"{uri}: not found"]
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(path) as stream:
                stream.read(1)
        else:
            fs.get_file_info(pafs.FileSelector(path))
    except OSError as err:
        return [f"{uri}: cannot read it ({_short(err)})"]
    return []


def model_loadable(spec: ModelSpec) -> list[str]:
    """A model directory with a config.json that parses, or an existing GGUF / package."""
    try:
        if spec.path is not None:
            config = os.path.join(os.path.expanduser(spec.path), "config.json")
            with open(config) as file:
                json.load(file)
        elif spec.gguf is not None:
            if not os.path.isfile(os.path.expanduser(spec.gguf)):
                return [f"GGUF file not found: {spec.gguf}"]
        elif spec.bundled is not None:
            bundled_file(spec.bundled)
    except FileNotFoundError:
        return [f"model directory {spec.path} has no config.json"]
    except json.JSONDecodeError as err:
        return [f"model directory {spec.path}: config.json is not JSON ({err})"]
    except ModelError as err:
        return [str(err)]
    return []


def endpoint_answers(engine: OpenAIEngineConfig) -> list[str]:
    """The endpoint lists its models with our key, and names the configured one."""
    import openai

    try:
        client = openai.OpenAI(
            base_url=engine.base_url,
            api_key=os.environ.get(engine.api_key_env) or "EMPTY",
            timeout=ENDPOINT_TIMEOUT_S,
            max_retries=0,
        )
        served = [m.id for m in client.models.list().data]
    except openai.AuthenticationError:
        return [f"{engine.base_url} refused the key in ${engine.api_key_env} (401)"]
    except openai.APIConnectionError as err:
        return [f"{engine.base_url} does not answer ({_short(err.__cause__ or err)})"]
    except openai.APIError as err:
        return [f"{engine.base_url}/models failed: {_short(err)}"]
    if engine.model not in served:
        return [f"{engine.base_url} does not serve model {engine.model!r} (it serves {served})"]
    return []


def _short(err: BaseException) -> str:
    return str(err).splitlines()[0][:200] if str(err) else type(err).__name__
