"""The spec classes plugins register: one attrs class per kind of extension.

Specs are plain data plus *references* to code (``"package.module:attribute"`` or a
callable).  A string reference is imported only when the pipeline needs it, so
listing plugins or validating a config never imports torch.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._+-]*$")
REF_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")

Ref = str | Callable[..., Any]


def _check_name(instance, attribute, value):
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be a lower-case name of letters, digits "
            f"and '.', '_', '+', '-' (got {value!r})"
        )


def _check_ref(instance, attribute, value):
    if value is None and attribute.default is None:
        return
    if callable(value):
        return
    if not isinstance(value, str) or not REF_PATTERN.match(value):
        raise ValueError(
            f"{type(instance).__name__}.{attribute.name} must be a callable or a 'package.module:attribute' "
            f"string (got {value!r})"
        )


def _check_str_tuple(instance, attribute, value):
    if not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{type(instance).__name__}.{attribute.name} must hold non-empty strings (got {value!r})")


def _tuple(value):
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def load_ref(ref: Ref) -> Any:
    """Import what a reference points at (``"pkg.mod:attr.sub"``), or return a callable as is."""
    if callable(ref):
        return ref
    module_name, _, attr_path = ref.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj


def env_var_for(prefix: str, name: str) -> str:
    """``env_var_for("MODEL", "llava-v1.5-7b") == "VISTUNE_MODEL_LLAVA_V1_5_7B"``."""
    return f"VISTUNE_{prefix}_" + re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_")


_name = attrs.field(validator=_check_name)
_description = attrs.field(default="", validator=attrs.validators.instance_of(str), kw_only=True)


def _names():
    return attrs.field(factory=tuple, converter=_tuple, validator=_check_str_tuple, kw_only=True)


@attrs.frozen
class ModelType:
    """A family of checkpoints that load and train the same way (``llava``, ``qwen2-vl``...).

    ``loader(path, options)`` returns ``(model, processor)`` for a local Hugging Face
    directory; ``options`` is a :class:`vistune.models.LoadOptions`.
    """

    name: str = _name
    loader: Ref = attrs.field(validator=_check_ref)
    default_template: str = attrs.field(validator=_check_name, kw_only=True)
    #: ``config.json`` ``architectures`` entries that identify this type.
    architectures: tuple[str, ...] = _names()
    #: ``config.json`` ``model_type`` values that identify this type.
    hf_model_types: tuple[str, ...] = _names()
    #: Module-name prefixes (as in ``model.named_modules()``) of each part.  Freeze
    #: options and LoRA target resolution use them.
    vision_tower: tuple[str, ...] = _names()
    projector: tuple[str, ...] = _names()
    language_model: tuple[str, ...] = _names()
    supports_packing: bool = attrs.field(default=False, kw_only=True)
    supports_multi_image: bool = attrs.field(default=False, kw_only=True)
    description: str = _description

    @property
    def is_vision(self) -> bool:
        return bool(self.vision_tower)


@attrs.frozen
class ModelAlias:
    """A short name for a well-known checkpoint (``llava-v1.5-7b``).

    No hub download happens at run time: the alias names the Hugging Face repo to
    fetch and the environment variable (or ``model_path`` key) that points at the
    local copy.  The Hugging Face cache is searched too.
    """

    name: str = _name
    model_type: str = attrs.field(validator=_check_name)
    hf_repo_id: str = attrs.field(validator=attrs.validators.matches_re(r"^[\w.-]+/[\w.-]+$"))
    description: str = _description

    @property
    def env_var(self) -> str:
        return env_var_for("MODEL", self.name)


@attrs.frozen
class Template:
    """Turns conversations and images into model inputs for one chat format.

    ``factory(processor, options)`` returns an encoder implementing
    :class:`vistune.templates.Encoder` (``encode`` for training samples,
    ``encode_prompt`` for generation).
    """

    name: str = _name
    factory: Ref = attrs.field(validator=_check_ref)
    description: str = _description


@attrs.frozen
class Adapter:
    """A way to make a model trainable: LoRA, DoRA, QLoRA, full fine-tuning...

    ``apply(model, model_type, config)`` returns the trainable model; ``merge(model)``
    (optional) returns a plain model with the adapter folded in, for export.
    """

    name: str = _name
    apply: Ref = attrs.field(validator=_check_ref)
    merge: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    #: Python modules that must be importable (checked without importing them).
    requires: tuple[str, ...] = _names()
    requires_cuda: bool = attrs.field(default=False, kw_only=True)
    description: str = _description


@attrs.frozen
class Algorithm:
    """An RL algorithm (``grpo``, ``dapo``...).

    ``factory(config)`` returns an object implementing
    :class:`vistune.rl.algorithm.RLAlgorithm`.  ``defaults`` are config values the
    algorithm implies (for example DAPO's ``epsilon_high``); the user's config wins.
    """

    name: str = _name
    factory: Ref = attrs.field(validator=_check_ref)
    defaults: Mapping[str, Any] = attrs.field(factory=dict, converter=dict, kw_only=True)
    description: str = _description


@attrs.frozen
class Reward:
    """A reward function for RL and for scoring inference outputs.

    ``factory(**options)`` returns a callable
    ``reward(prompts, completions, **columns) -> list[float | None]`` (or a coroutine
    function returning that list).  ``None`` means "does not apply to this sample".
    Rewards are called by keyword, TRL-style (``reward(completions, solution, **kwargs)``
    works too); :mod:`vistune.rl.rewards` lists the arguments.
    """

    name: str = _name
    factory: Ref = attrs.field(validator=_check_ref)
    description: str = _description


@attrs.frozen
class Backend:
    """An inference engine (``transformers``, ``vllm``, ``sglang``).

    ``factory(model_path, model_type, config)`` returns an object implementing
    :class:`vistune.inference.Engine`.
    """

    name: str = _name
    factory: Ref = attrs.field(validator=_check_ref)
    requires: tuple[str, ...] = _names()
    requires_cuda: bool = attrs.field(default=False, kw_only=True)
    #: The engine splits one model over ``tensor_parallel_size`` GPUs itself.
    tensor_parallel: bool = attrs.field(default=False, kw_only=True)
    description: str = _description


@attrs.frozen
class Dataset:
    """A named dataset and where it lives locally.

    ``format`` is one of :data:`vistune.data.readers.FORMATS`.  The local copy is found
    through ``dataset_path`` in the config, the environment variable
    ``VISTUNE_DATASET_<NAME>``, or built on demand by ``builder(directory, spec)`` for
    datasets generated locally (``directory`` may not exist yet; ``spec`` is this
    Dataset, so one builder can serve several datasets).  Inside that directory the
    records are in ``data_file`` and relative image paths are resolved against
    ``image_dir``.
    """

    name: str = _name
    format: str = attrs.field(validator=attrs.validators.in_(("messages", "llava-instruct", "hf-disk")))
    data_file: str = attrs.field(default="", kw_only=True)
    image_dir: str = attrs.field(default="", kw_only=True)
    hf_repo_id: str = attrs.field(default="", kw_only=True)
    builder: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    description: str = _description

    @property
    def env_var(self) -> str:
        return env_var_for("DATASET", self.name)
