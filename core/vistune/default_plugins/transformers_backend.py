"""The default inference backend: transformers ``generate`` with request batching."""

from vistune import hookimpl
from vistune.specs import Backend


@hookimpl
def vistune_register_backends(register):
    register(
        Backend(
            "transformers",
            factory="vistune.inference.transformers_engine:TransformersEngine",
            requires=("torch", "transformers"),
            description="transformers generate(), batching concurrent requests",
        )
    )
