"""vistune hooks of the vLLM plugin: one backend.  vllm itself is imported only when an engine is built."""

from vistune import hookimpl
from vistune.specs import Backend
from vistune_vllm.translate import OPTIONS


@hookimpl
def vistune_register_backends(register):
    register(
        Backend(
            "vllm",
            factory="vistune_vllm.engine:VllmEngine",
            requires=("vllm",),
            tensor_parallel=True,
            options=OPTIONS,
            description="vLLM (paged attention, continuous batching, tensor parallel, LoRA, quantized checkpoints)",
        )
    )
