"""SGLang backend for vistune: an :class:`vistune.inference.Engine` over ``sglang.Engine`` (CUDA only)."""
