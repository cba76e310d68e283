"""Inference engines: the :class:`Engine` interface and its request/result types.

Backends (``transformers`` in core, ``vllm`` and ``sglang`` as plugins) are registered
with ``vistune_register_backends``; their factories return an :class:`Engine`.
Importing this package is cheap: the transformers engine lives in
:mod:`vistune.inference.transformers_engine`, imported when used.
"""

from vistune.inference.engine import (
    BASE_ADAPTER,
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionOutput,
    Engine,
    EngineClosedError,
    GenerationRequest,
    GenerationResult,
    RequestError,
    SamplingParams,
    StreamEvent,
    check_adapter,
    check_context,
    collect,
)

__all__ = [
    "BASE_ADAPTER",
    "FINISH_LENGTH",
    "FINISH_STOP",
    "CompletionOutput",
    "Engine",
    "EngineClosedError",
    "GenerationRequest",
    "GenerationResult",
    "RequestError",
    "SamplingParams",
    "StreamEvent",
    "check_adapter",
    "check_context",
    "collect",
]
