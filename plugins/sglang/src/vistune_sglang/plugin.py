"""vistune hooks of the SGLang plugin: one backend.  sglang itself is imported only when an engine is built."""

from vistune import hookimpl
from vistune.specs import Backend


@hookimpl
def vistune_register_backends(register):
    register(
        Backend(
            "sglang",
            factory="vistune_sglang.engine:SglangEngine",
            requires=("sglang",),
            tensor_parallel=True,
            requires_cuda=True,  # its kernel package (sgl-kernel) is built for CUDA only
            description="SGLang (RadixAttention prefix cache, continuous batching, tensor parallel); CUDA GPUs only",
        )
    )
