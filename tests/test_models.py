"""Model preparation: the bundled GGUF teacher becomes a plain HF directory, once.

The bundled model is converted for real (about 20 s on 2 cores), once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from radiag.models import MARKER, ModelError, ModelSpec, model_cache_dir, prepare_model
from radiag.precision import this_machine


@pytest.fixture(scope="module")
def cache(model_cache: Path) -> Path:
    """The session's model cache (conftest), where the bundled teacher is prepared once."""
    return model_cache


@pytest.fixture(scope="module")
def smollm2(cache: Path) -> Path:
    return prepare_model(ModelSpec(), cache_dir=cache)


@pytest.fixture(scope="module")
def loaded(smollm2: Path) -> tuple[Any, Any]:
    return AutoTokenizer.from_pretrained(smollm2), AutoModelForCausalLM.from_pretrained(smollm2)


def test_the_default_spec_is_the_bundled_teacher() -> None:
    assert ModelSpec().bundled == "smollm2-135m-instruct"
    assert ModelSpec(path="/models/x").bundled is None
    assert ModelSpec(gguf="/models/x.gguf").bundled is None


@pytest.mark.parametrize(
    "fields",
    [
        {"bundled": "smollm2-135m-instruct", "path": "/models/x"},
        {"path": "/models/x", "gguf": "/models/x.gguf"},
        {"bundled": None},
        {"bundled": None, "path": None, "gguf": None},
    ],
)
def test_a_spec_needs_exactly_one_source(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of bundled, path, gguf"):
        ModelSpec(**fields)


def test_the_cache_dir_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RADIAG_MODEL_CACHE", str(tmp_path))
    assert model_cache_dir() == tmp_path
    monkeypatch.delenv("RADIAG_MODEL_CACHE")
    assert model_cache_dir() == Path.home() / ".cache" / "radiag" / "models"


def test_a_path_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        prepare_model(ModelSpec(path=str(tmp_path)))


def test_a_missing_gguf_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "absent.gguf"
    with pytest.raises(ModelError, match=r"absent\.gguf"):
        prepare_model(ModelSpec(gguf=str(missing)), cache_dir=tmp_path)


def test_the_bundled_model_becomes_a_complete_hf_directory_in_this_machines_precision(
    smollm2: Path, cache: Path
) -> None:
    _, auto = this_machine()
    assert smollm2 == cache / f"smollm2-135m-instruct-{auto}"
    assert (smollm2 / "config.json").is_file()
    assert list(smollm2.glob("*.safetensors"))
    assert json.loads((smollm2 / MARKER).read_text())["dtype"] == auto
    assert json.loads((smollm2 / "config.json").read_text())["dtype"] == auto
    assert [p.name for p in cache.iterdir()] == [smollm2.name]  # no .partial left


def test_a_prepared_directory_is_reused_not_rewritten(smollm2: Path, cache: Path) -> None:
    before = (smollm2 / MARKER).stat().st_mtime_ns
    assert prepare_model(ModelSpec(), cache_dir=cache) == smollm2
    assert (smollm2 / MARKER).stat().st_mtime_ns == before


def test_an_hf_directory_is_used_as_is(smollm2: Path) -> None:
    assert prepare_model(ModelSpec(path=str(smollm2))) == smollm2


def test_the_chat_template_survives_conversion(loaded: tuple[Any, Any]) -> None:
    tokenizer, _ = loaded
    message = "A 74-year-old woman with MMSE 23/30. What is the diagnosis?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    assert message in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_greedy_generation_gives_text(loaded: tuple[Any, Any]) -> None:
    tokenizer, model = loaded
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name one part of the brain."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new_tokens = output[0, prompt_length:]
    assert len(new_tokens) == 8
    assert tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
