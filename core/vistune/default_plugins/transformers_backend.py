"""The default inference backend: a transformers model with continuous batching."""

from vistune import hookimpl
from vistune.specs import Backend


@hookimpl
def vistune_register_backends(register):
    register(
        Backend(
            "transformers",
            factory="vistune.inference.transformers_engine:TransformersEngine",
            requires=("torch", "transformers"),
            description="a transformers model with continuous batching (requests join and leave the running batch)",
        )
    )
