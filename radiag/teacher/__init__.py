"""The teacher: prompts, engines (vLLM, OpenAI-compatible), answer parsing, rationale
quality control, exemplar retrieval, and the rationalize / diagnose stages on Ray Data."""
