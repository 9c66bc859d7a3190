"""The engine of a config: the one place that knows every backend.

`engines` holds what callers share (configs, the protocol, sampling); each backend module
imports it, and this module imports a backend only when an engine of its kind starts, so
nothing imports in a circle and a command that starts no engine never loads vLLM or openai.
"""

from __future__ import annotations

from radiag.teacher.engines import Engine, OpenAIEngineConfig, VllmEngineConfig


def build_engine(cfg: VllmEngineConfig | OpenAIEngineConfig) -> Engine:
    """The engine of a config, started in this process."""
    if isinstance(cfg, VllmEngineConfig):
        from radiag.teacher.vllm_engine import VllmEngine

        return VllmEngine(cfg)
    from radiag.teacher.openai_engine import OpenAIEngine

    return OpenAIEngine(cfg)
