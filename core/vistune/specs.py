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


#: Value types an :class:`Option` may declare; the config reads them as it reads core keys of the same type.
OPTION_TYPES = ("str", "path", "int", "float", "bool", "str_list", "dict")
OPTION_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def _check_option_name(instance, attribute, value):
    if value is None and attribute.default is None:
        return
    if not isinstance(value, str) or not OPTION_NAME_PATTERN.match(value):
        raise ValueError(f"Option.{attribute.name} must be a lower-case identifier (letters, digits, '_'), "
                         f"got {value!r}")  # fmt: skip


@attrs.frozen
class Option:
    """One setting a plugin declares: users set it in the YAML section named after the plugin.

    ``lora: {rank: 16}`` (or ``--lora.rank 16``) sets the option ``rank`` of the plugin
    named ``lora``.  The config checks the value against ``type``, ``choices`` and the
    bounds before anything loads, with the file and line of the key;
    :func:`vistune.options.option_values` gives the plugin its values over the defaults.
    ``alias`` is a flat config key that sets the option too (``lora_rank``), kept for
    configs written before the option moved into its plugin.
    """

    name: str = attrs.field(validator=_check_option_name)
    type: str = attrs.field(validator=attrs.validators.in_(OPTION_TYPES))
    default: Any = attrs.field()
    help: str = attrs.field(validator=attrs.validators.instance_of(str))
    choices: tuple[Any, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(tuple), kw_only=True
    )
    minimum: float | None = attrs.field(default=None, kw_only=True)
    maximum: float | None = attrs.field(default=None, kw_only=True)
    alias: str | None = attrs.field(default=None, validator=_check_option_name, kw_only=True)


def _check_options(instance, attribute, value):
    names = [getattr(option, "name", None) for option in value]
    if not all(isinstance(option, Option) for option in value):
        raise ValueError(f"{type(instance).__name__}.options must hold vistune.specs.Option instances (got {value!r})")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{type(instance).__name__}.options declares {', '.join(repeated)} more than once")


def _options():
    return attrs.field(factory=tuple, converter=tuple, validator=_check_options, kw_only=True)


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

    The alias names the Hugging Face repo it comes from and the environment variable
    (or ``model_path`` key) that points at a local copy.  The Hugging Face cache is
    searched too; with no local copy, the run downloads the repo into that cache
    (:mod:`vistune.model_hub`) before it loads anything.
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
    #: Settings of the template, read from the YAML section named after it.
    options: tuple[Option, ...] = _options()
    description: str = _description


@attrs.frozen
class Adapter:
    """A way to make a model trainable: LoRA, DoRA, QLoRA, full fine-tuning...

    ``apply(model, model_type, config)`` returns the trainable model; ``merge(model)``
    (optional) returns a plain model with the adapter folded in, for export.

    The other fields tell the pipelines what the adapter is, instead of them knowing
    adapters by name: whether its weights are a peft adapter (an SFT adapter is trained
    further under it, and a KL term's reference model is the policy with the adapter
    disabled), which quantization it needs, and what it changes in the Trainer.
    """

    name: str = _name
    apply: Ref = attrs.field(validator=_check_ref)
    merge: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    #: Python modules that must be importable (checked without importing them).
    requires: tuple[str, ...] = _names()
    requires_cuda: bool = attrs.field(default=False, kw_only=True)
    #: ``apply`` returns a peft model whose adapter can be disabled (``disable_adapter()``) and saved alone.
    peft_adapter: bool = attrs.field(default=False, kw_only=True)
    #: Quantization methods (:attr:`vistune.quantization.QuantizationScheme.method`, e.g. ``bnb-4bit``)
    #: the base model must be loaded with; empty: any, including none.
    quantization_methods: tuple[str, ...] = _names()
    #: ``trainer_overrides(config, model_type) -> dict`` of ``TrainingArguments`` keywords
    #: the adapter needs (GaLore's ``optim``), merged over vistune's own.
    trainer_overrides: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    #: ``vision_tower_lr`` and ``projector_lr`` can apply; false when the adapter's optimizer
    #: builds its own parameter groups (GaLore).
    part_learning_rates: bool = attrs.field(default=True, kw_only=True)
    #: Settings of the adapter, read from the YAML section named after it.
    options: tuple[Option, ...] = _options()
    description: str = _description


@attrs.frozen
class Algorithm:
    """An RL algorithm (``grpo``, ``dapo``...).

    ``factory(config)`` returns an object implementing
    :class:`vistune.rl.algorithm.RLAlgorithm`.  ``defaults`` are config values the
    algorithm implies (for example DAPO's ``epsilon_high``); the user's config wins.

    An algorithm that does not learn from rollouts (DPO learns from stored preference
    pairs) names a ``pipeline``: ``pipeline(plan)`` then runs ``vistune rl`` for it in
    place of the online loop, and ``factory(config)`` returns whatever that pipeline
    trains with.  Such a run needs no rewards and no generation backend; the core keys it
    reads that ``vistune rl`` does not (``dataloader_num_workers``) are listed in ``reads``.
    """

    name: str = _name
    factory: Ref = attrs.field(validator=_check_ref)
    defaults: Mapping[str, Any] = attrs.field(factory=dict, converter=dict, kw_only=True)
    pipeline: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    #: Core config keys the algorithm reads that ``vistune rl`` itself does not (a ``pipeline`` that
    #: starts DataLoader workers reads ``dataloader_num_workers``): the plan does not call them unused.
    reads: tuple[str, ...] = _names()
    #: Settings of the algorithm: the YAML section named after it, or ``algorithm_options``.
    options: tuple[Option, ...] = _options()
    description: str = _description


@attrs.frozen
class Reward:
    """A reward function for RL and for scoring inference outputs.

    ``factory(**options)`` returns a callable
    ``reward(prompts, completions, **columns) -> list[float | None]`` (or a coroutine
    function returning that list).  ``None`` means "does not apply to this sample".
    Rewards are called by keyword, TRL-style (``reward(completions, solution, **kwargs)``
    works too); :mod:`vistune.rl.rewards` lists the arguments.  Declared ``options`` are
    passed to ``factory`` with their defaults filled in; each ``rewards:`` entry's
    ``options`` override the section named after the reward.
    """

    name: str = _name
    factory: Ref = attrs.field(validator=_check_ref)
    #: Settings of the reward (keyword arguments of ``factory``).
    options: tuple[Option, ...] = _options()
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
    #: Settings of the engine, read from the YAML section named after the backend.
    options: tuple[Option, ...] = _options()
    description: str = _description


@attrs.frozen
class Dataset:
    """A named dataset and where it lives locally.

    ``format`` names a registered :class:`DataFormat` (``messages``, ``llava-instruct``,
    ``hf-disk``...).  The local copy is found
    through ``dataset_path`` in the config, the environment variable
    ``VISTUNE_DATASET_<NAME>``, or built on demand by ``builder(directory, spec)`` for
    datasets generated locally (``directory`` may not exist yet; ``spec`` is this
    Dataset, so one builder can serve several datasets).  Inside that directory the
    records are in ``data_file`` and relative image paths are resolved against
    ``image_dir``.

    A builder that declares an ``options`` parameter (or ``**kwargs``) is called
    ``builder(directory, spec, options=values)``: the values of this dataset's
    ``options``, defaults filled in.  A copy built with values other than the defaults
    lives in a directory of its own (``<name>-<hash of the changed values>``), so a run
    never reads a copy built with other values; the defaults keep ``<name>``.
    """

    name: str = _name
    format: str = attrs.field(validator=_check_name)
    data_file: str = attrs.field(default="", kw_only=True)
    image_dir: str = attrs.field(default="", kw_only=True)
    hf_repo_id: str = attrs.field(default="", kw_only=True)
    builder: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    #: Settings of the dataset, read from the YAML section named after it.
    options: tuple[Option, ...] = _options()
    description: str = _description

    @property
    def env_var(self) -> str:
        return env_var_for("DATASET", self.name)


def _check_data_format(instance, attribute, value):
    if instance.read is None and instance.open_source is None:
        raise ValueError(f"DataFormat {instance.name!r} needs read (a record format) or open_source (a source format)")
    if instance.detect is not None and instance.read is None:
        raise ValueError(f"DataFormat {instance.name!r}: detect needs read, to read the records it detects")
    if instance.detect_source is not None and instance.open_source is None:
        raise ValueError(f"DataFormat {instance.name!r}: detect_source needs open_source, to open what it detects")


@attrs.frozen
class DataFormat:
    """How dataset records are written (``messages``, ShareGPT, Alpaca...), or where they come from.

    A *record format* has ``read(record, where)``: one record (a dict) as a
    :class:`vistune.templates.Sample` whose messages hold one ``<image>`` tag per image,
    whose ``images`` are references in tag order (paths, URLs, ``{"bytes", "path"}``
    mappings; nothing opened), and whose ``columns`` keep the record's other fields
    (rewards get them by name).  ``where`` (``file:line``) starts every
    :class:`vistune.errors.DataError` it raises.  ``detect(record) -> bool`` lets the
    reader pick the format of a record whose dataset declares none: exactly one format
    must claim it.

    A *source format* has ``open_source(location)``: a record source (see
    :mod:`vistune.data.sources`) for a dataset that is not a JSON/JSONL file, such as a
    ``datasets`` directory or a hub id; ``detect_source(location) -> bool`` claims the
    ``dataset:`` values it opens.  Its records are then read by the declared record
    format, or detected one by one.
    """

    name: str = _name
    read: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    detect: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    open_source: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    detect_source: Ref | None = attrs.field(default=None, validator=_check_ref, kw_only=True)
    #: The fields that mark a record of this format, named when no format claims a record.
    fields: tuple[str, ...] = _names()
    #: One record as the format's own documentation writes it (checked by ``check_data_format``).
    example: Mapping[str, Any] | None = attrs.field(default=None, kw_only=True, validator=_check_data_format)
    description: str = _description

    @property
    def is_source(self) -> bool:
        return self.open_source is not None
