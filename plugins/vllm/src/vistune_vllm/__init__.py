"""vLLM backend for vistune: an :class:`vistune.inference.Engine` over vLLM's ``AsyncLLM``."""
