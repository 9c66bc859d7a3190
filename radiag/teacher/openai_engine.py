"""The `openai` backend: any OpenAI-compatible chat endpoint (a vLLM API server, a hosted
API, our own Serve app) through the async `openai` client.

One client per engine, on the engine's own loop: every conversation is a request,
bounded (requests in flight per replica), rate-limited and retried, and a request that
fails for good becomes an error `Completion` without failing any other row.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Sequence

import openai

from radiag.teacher.engines import (
    AsyncEngine,
    Completion,
    Messages,
    OpenAIEngineConfig,
    SamplingConfig,
)

BACKOFF_BASE_S = 0.5  # first retry waits 0.25-0.5 s, then doubles
BACKOFF_CAP_S = 30.0
ERROR_CHARS = 500  # server messages can echo the whole prompt: keep the error column small
# Worth another try: connection failures and timeouts, 429, 5xx. Other 4xx will not change.
RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)


class OpenAIEngine(AsyncEngine):
    """Engine protocol over an OpenAI-compatible `/v1/chat/completions` endpoint.

    Features and the config fields that control them: requests in flight per replica
    (`max_concurrency`), request spacing (`requests_per_second`), retries with exponential
    backoff and jitter on connection errors, timeouts, 429 and 5xx (`max_retries`), per
    request timeout (`timeout_s`), key read from the environment (`api_key_env`; unset
    means "EMPTY", which a local vLLM server without `--api-key` accepts), server-specific
    request fields (`extra_body`; a hosted API rejects fields it does not know with a 400).

    `answer_prefix`/`answer_choices` are ignored: a generic endpoint has no portable way
    to constrain only the final line, so the prompt asks for it instead.
    """

    backend = "openai"

    def __init__(self, cfg: OpenAIEngineConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = cfg.model
        self.client = openai.AsyncOpenAI(
            api_key=os.environ.get(cfg.api_key_env) or "EMPTY",
            base_url=cfg.base_url,
            max_retries=0,  # retries are ours: same policy for every error kind, with jitter
            timeout=cfg.timeout_s,
        )
        self.limit = asyncio.Semaphore(cfg.max_concurrency)
        self.spacing = _Spacing(cfg.requests_per_second)

    async def _complete(
        self,
        conversation: Messages,
        sampling: SamplingConfig,
        answer_prefix: str | None,
        answer_choices: Sequence[str] | None,
    ) -> Completion:
        """One conversation; latency counts from the first attempt, retries included."""
        params = dict(
            model=self.cfg.model,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            extra_body=self.cfg.extra_body,
        )
        async with self.limit:
            start = time.perf_counter()
            for attempt in range(self.cfg.max_retries + 1):
                await self.spacing.wait()
                try:
                    with self.stats.request():
                        response = await self.client.chat.completions.create(
                            messages=conversation, **params
                        )
                    break
                except RETRYABLE as exc:
                    error = f"{_describe(exc)} [attempts: {attempt + 1}]"
                    if attempt == self.cfg.max_retries:
                        return _failed(error, time.perf_counter() - start, transient=True)
                    delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                except openai.APIError as exc:  # 400 (prompt too long), 401, 404, bad response
                    return _failed(_describe(exc), time.perf_counter() - start)
        choice = response.choices[0]
        usage = response.usage
        return Completion(
            text=choice.message.content or "",
            finish_reason=choice.finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            latency_s=time.perf_counter() - start,
        )


class _Spacing:
    """Rate limit: successive requests start at least 1/rate seconds apart (no bursts)."""

    def __init__(self, requests_per_second: float | None) -> None:
        self.interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            delay = self.next_start - now
            self.next_start = max(now, self.next_start) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


def _describe(exc: openai.APIError) -> str:
    """Status code and the server's own message (not the client's wrapper text), truncated."""
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return f"connection failed: {exc.__cause__ or exc}"
    body = exc.body  # the JSON "error" field: an object with "message", or a bare string
    message = (body.get("message") if isinstance(body, dict) else body) or exc.message
    status = getattr(exc, "status_code", None)
    return (f"HTTP {status}: " if status else "") + str(message)[:ERROR_CHARS]


def _failed(error: str, latency_s: float, transient: bool = False) -> Completion:
    return Completion("", None, 0, 0, latency_s, error=error, transient=transient)
