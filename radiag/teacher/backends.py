"""The engine of a config: the one place that knows every backend.

`engines` holds what callers share (configs, the protocol, sampling); each backend module
imports it, and this module imports the backends, so nothing imports in a circle. The
backends import their heavy libraries (vLLM, openai) only when an engine starts.
"""

from __future__ import annotations

from radiag.teacher.engines import Engine, OpenAIEngineConfig, VllmEngineConfig
from radiag.teacher.openai_engine import OpenAIEngine
from radiag.teacher.vllm_engine import VllmEngine


def build_engine(cfg: VllmEngineConfig | OpenAIEngineConfig) -> Engine:
    """The engine of a config, started in this process."""
    if isinstance(cfg, VllmEngineConfig):
        return VllmEngine(cfg)
    return OpenAIEngine(cfg)
