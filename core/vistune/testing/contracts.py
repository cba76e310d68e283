"""Contract checks for each kind of spec, for the test suites of plugins.

Each ``check_*`` function exercises one spec the way vistune's pipelines use it and
raises :class:`ContractError` (an ``AssertionError``, so pytest reports a plain test
failure) saying what is wrong and how to fix it.  Each returns what it built, so a
test can go on to check the plugin's own behaviour::

    from vistune.testing import check_reward

    def test_contains_answer(plugin_manager):
        spec = plugin_manager.registries.rewards.get("contains-answer")
        scores = check_reward(spec, ["What colour?"], ["It is red."], {"answer": ["red"]})
        assert scores == [1.0]

Importing this module is cheap: ``check_algorithm`` imports torch when called (an
algorithm works on tensors); the other checks reach torch only through the spec's own
code (loaders, adapters, engines).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vistune import specs
from vistune.errors import VistuneError
from vistune.templates import IGNORE_INDEX, IMAGE_TAG, Sample, TemplateOptions


class ContractError(AssertionError):
    """A spec does not do what vistune's pipelines rely on."""


def _fail_unless(condition: Any, spec: Any, message: str) -> None:
    if not condition:
        raise ContractError(f"{type(spec).__name__} {getattr(spec, 'name', spec)!r}: {message}")


def _check_spec_type(spec: Any, expected: type) -> None:
    if not isinstance(spec, expected):
        raise ContractError(f"expected a vistune.specs.{expected.__name__}, got {spec!r}")


def _check_requirements(spec: specs.Adapter | specs.Backend) -> None:
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    _fail_unless(not missing, spec, f"needs {', '.join(missing)}, which is not installed")


def _load(spec: Any, field: str) -> Any:
    ref = getattr(spec, field)
    try:
        return specs.load_ref(ref)
    except (ImportError, AttributeError) as exc:
        raise ContractError(
            f"{type(spec).__name__} {spec.name!r}: {field} {ref!r} cannot be loaded: {type(exc).__name__}: {exc}"
        ) from exc


def _missing_members(obj: Any, module: str, name: str) -> list[str]:
    """Public methods and attributes of protocol ``module.name`` that ``obj`` lacks."""
    protocol = getattr(importlib.import_module(module), name)
    methods = [n for n, v in vars(protocol).items() if not n.startswith("_") and callable(v)]
    attributes = [n for n in getattr(protocol, "__annotations__", {}) if not n.startswith("_")]
    return sorted([m for m in methods if not callable(getattr(obj, m, None))] +
                  [a for a in attributes if not hasattr(obj, a)])  # fmt: skip


def _run(result: Any) -> Any:
    """Await ``result`` if it is awaitable, from sync code, even under a running event loop."""
    if not inspect.isawaitable(result):
        return result

    async def wait():
        return await result

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(wait())
    import concurrent.futures  # a loop is running in this thread (async test): use another thread

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, wait()).result()


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# -- models --------------------------------------------------------------------------


def check_options(spec: Any) -> tuple[specs.Option, ...]:
    """The options a spec declares can be set and read as the config reads them.

    Each is a :class:`vistune.specs.Option` with a valid, unique name; its help is one
    non-empty line; its default is already a value of its type (and among its choices,
    within its bounds) or null; its choices are values of its type; its flat alias is not
    a core config key, and the plugin's name (its section) is not one either.

    :returns: the declared options.
    """
    from vistune.config import FIELDS, KEY_ALIASES
    from vistune.errors import ConfigError
    from vistune.options import convert_option

    options = getattr(spec, "options", ())
    _fail_unless(isinstance(options, tuple) and all(isinstance(o, specs.Option) for o in options), spec,
                 f"options must be a tuple of vistune.specs.Option, got {options!r}")  # fmt: skip
    if not options:
        return options
    core_keys = set(FIELDS) | set(KEY_ALIASES)
    _fail_unless(spec.name not in core_keys, spec, f"its options section would be the config key {spec.name!r}; "
                 "rename the plugin, or its options cannot be set")  # fmt: skip
    names = [option.name for option in options]
    _fail_unless(len(set(names)) == len(names), spec, f"options declare a name twice: {names}")
    for option in options:
        what = f"option {option.name!r}"
        _fail_unless(specs.OPTION_NAME_PATTERN.match(option.name), spec, f"{what}: not a lower-case identifier")
        _fail_unless(isinstance(option.help, str) and option.help.strip() and "\n" not in option.help, spec,
                     f"{what}: help must be one non-empty line")  # fmt: skip
        for choice in option.choices or ():
            try:
                ok = convert_option(attrs.evolve(option, choices=None), choice, what, "choices") == choice
            except ConfigError:
                ok = False
            _fail_unless(ok, spec, f"{what}: choice {choice!r} is not a {option.type} value")
        try:
            converted = convert_option(option, option.default, what, "default")
        except ConfigError as exc:
            raise ContractError(f"{type(spec).__name__} {spec.name!r}: {what}: its default {option.default!r} is not "
                                f"valid: {exc.message.removeprefix('default: ')}") from None  # fmt: skip
        _fail_unless(converted == option.default and type(converted) is type(option.default), spec,
                     f"{what}: its default {option.default!r} is not a {option.type} value as the config reads it "
                     f"(it would read as {converted!r})")  # fmt: skip
        if option.minimum is not None and option.maximum is not None:
            _fail_unless(option.minimum <= option.maximum, spec, f"{what}: minimum is above maximum")
        if option.alias is not None:
            _fail_unless(option.alias not in core_keys, spec,
                         f"{what}: its alias {option.alias!r} is a core config key")  # fmt: skip
    return options


def check_model_type(spec: specs.ModelType, checkpoint_dir: str | Path, options: Any = None, *, plugin_manager=None):
    """Load ``checkpoint_dir`` with the model type and check what pipelines rely on.

    Checks: ``config.json`` matches the spec's ``architectures`` / ``hf_model_types``
    (so detection finds this type); the default template is registered; the loader
    returns ``(model, processor)``; every ``vision_tower`` / ``projector`` /
    ``language_model`` prefix names modules of the loaded model, and the vision parts
    do not lie inside a language-model prefix (LoRA scoping relies on that).

    :param options: a :class:`vistune.models.LoadOptions` (default: ``LoadOptions()``).
    :param plugin_manager: where to look up the default template (default: the
        process-wide manager, which includes plugins added with ``register_plugin``).
    :returns: ``(model, processor)``.
    """
    from vistune.models import LoadOptions, read_hf_config

    _check_spec_type(spec, specs.ModelType)
    directory = Path(checkpoint_dir)
    try:
        hf_config = read_hf_config(directory)
    except VistuneError as exc:
        raise ContractError(str(exc)) from exc
    if spec.architectures or spec.hf_model_types:
        architectures = set(hf_config.get("architectures") or [])
        _fail_unless(
            architectures & set(spec.architectures) or hf_config.get("model_type") in spec.hf_model_types,
            spec,
            f"{directory}/config.json (architectures {sorted(architectures)}, model_type "
            f"{hf_config.get('model_type')!r}) matches neither architectures {list(spec.architectures)} nor "
            f"hf_model_types {list(spec.hf_model_types)}, so vistune would not detect this checkpoint as this type",
        )
    if plugin_manager is None:
        from vistune.plugins import get_plugin_manager

        plugin_manager = get_plugin_manager()
    _fail_unless(
        spec.default_template in plugin_manager.registries.templates,
        spec,
        f"default_template {spec.default_template!r} is not registered "
        f"(registered: {', '.join(plugin_manager.registries.templates.names()) or 'none'})",
    )
    _fail_unless(spec.language_model, spec, "language_model is empty: adapters could not tell where the LLM is")
    loader = _load(spec, "loader")
    result = loader(str(directory), options if options is not None else LoadOptions())
    _fail_unless(
        isinstance(result, tuple) and len(result) == 2, spec, f"loader must return (model, processor), got {result!r}"
    )
    model, processor = result
    _fail_unless(processor is not None, spec, "loader returned no processor")
    _fail_unless(callable(getattr(model, "named_modules", None)), spec, f"loader returned {model!r}, not a torch module")
    names = [name for name, _ in model.named_modules() if name]
    top = sorted({name.split(".")[0] for name in names})
    for part in ("vision_tower", "projector", "language_model"):
        for prefix in getattr(spec, part):
            _fail_unless(
                any(_under(name, [prefix]) for name in names),
                spec,
                f"{part} prefix {prefix!r} matches no module of the loaded model "
                f"(top-level modules: {', '.join(top)}; see model.named_modules())",
            )
    for part in ("vision_tower", "projector"):
        for prefix in getattr(spec, part):
            _fail_unless(
                not _under(prefix, spec.language_model),
                spec,
                f"{part} prefix {prefix!r} lies inside language_model {list(spec.language_model)}: LoRA restricted to "
                "the language model would also adapt it; list the language model's own submodules instead",
            )
    return model, processor


# -- templates -----------------------------------------------------------------------


def _int_list(value: Any, what: str, spec: Any) -> list[int]:
    _fail_unless(
        isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        spec,
        f"{what} must be a list of ints, got {type(value).__name__}"
        + (" (convert tensors with .tolist())" if hasattr(value, "tolist") else ""),
    )
    return list(value)


def _squash(text: str) -> str:
    """Text without whitespace: tokenisers may change spacing around special tokens."""
    return "".join(text.replace(IMAGE_TAG, "").split())


def check_template(
    spec: specs.Template, processor: Any, sample: Sample, options: TemplateOptions | None = None, *,
    prompt_is_prefix: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Build the template's encoder for ``processor`` and check it on ``sample``.

    ``sample`` must end with an assistant answer.  Checks: ``encode`` returns
    ``input_ids`` and ``labels`` as lists of ints of the same length; each label is
    the token itself or ``-100``; the assistant answers are supervised and the system
    and user text is not; images give ``pixel_values``; a sample longer than
    ``max_length`` is dropped (``None``) or raises :class:`vistune.errors.VistuneError`
    as ``truncation`` says; ``encode_prompt`` on the conversation without its last
    answer returns ``input_ids`` that start the training sequence (so the model is
    prompted as it was trained; pass ``prompt_is_prefix=False`` for formats that
    differ on purpose); ``decode`` returns text.

    :returns: what ``encode`` returned for ``sample``.
    """
    _check_spec_type(spec, specs.Template)
    declared = check_options(spec)
    options = options or TemplateOptions(plugin_options={option.name: option.default for option in declared})
    factory = _load(spec, "factory")
    encoder = factory(processor, options)
    for method in ("encode", "encode_prompt", "decode"):
        _fail_unless(callable(getattr(encoder, method, None)), spec, f"the encoder has no {method}() method")
    roles = [m.get("role") for m in sample.messages]
    if not roles or roles[-1] != "assistant":
        raise ContractError("check_template needs a sample that ends with an assistant message")

    encoded = encoder.encode(sample)
    _fail_unless(isinstance(encoded, Mapping), spec, f"encode() must return a mapping, got {encoded!r}")
    ids = _int_list(encoded.get("input_ids"), "encode()['input_ids']", spec)
    labels = _int_list(encoded.get("labels"), "encode()['labels']", spec)
    _fail_unless(len(ids) == len(labels), spec, f"input_ids has {len(ids)} tokens but labels has {len(labels)}")
    for i, (token, label) in enumerate(zip(ids, labels)):
        _fail_unless(label in (IGNORE_INDEX, token), spec,
                     f"labels[{i}] is {label} but input_ids[{i}] is {token}: a label is the token or {IGNORE_INDEX}")  # fmt: skip
    supervised = [t for t, label in zip(ids, labels) if label != IGNORE_INDEX]
    _fail_unless(supervised, spec, f"every label is {IGNORE_INDEX}: training on this sample would learn nothing")
    _fail_unless(labels[0] == IGNORE_INDEX, spec, "the first token is supervised: the prompt must be masked")
    learned = _squash(encoder.decode(supervised))
    answers = [_squash(m["content"]) for m in sample.messages if m["role"] == "assistant"]
    for answer in answers:
        _fail_unless(answer in learned, spec,
                     f"the assistant answer {answer!r} is not (wholly) supervised; supervised text: {learned!r}")  # fmt: skip
    for message in sample.messages:
        text = _squash(message["content"])
        if message["role"] != "assistant" and text and not any(text in a for a in answers):
            _fail_unless(text not in learned, spec,
                         f"the {message['role']} text {text!r} is supervised: labels must be {IGNORE_INDEX} outside "
                         "the assistant answers")  # fmt: skip
    if sample.images:
        _fail_unless("pixel_values" in encoded, spec, "the sample has images but encode() returned no pixel_values")

    for truncation in ("drop", "error"):
        short = factory(processor, attrs.evolve(options, max_length=len(ids) - 1, truncation=truncation))
        try:
            result = short.encode(sample)
        except VistuneError:
            _fail_unless(truncation == "error", spec, "with truncation 'drop' a too-long sample must give None, not raise")
        else:
            _fail_unless(
                truncation == "drop" and result is None,
                spec,
                f"a sample longer than max_length ({len(ids)} > {len(ids) - 1}) with truncation {truncation!r} must "
                + ("give None" if truncation == "drop" else "raise vistune.errors.DataError")
                + f"; encode() returned {type(result).__name__}",
            )

    last_answer = max(i for i, role in enumerate(roles) if role == "assistant")
    prompt_sample = Sample(sample.messages[:last_answer], sample.images, sample.columns, sample.source)
    prompt = encoder.encode_prompt(prompt_sample)
    _fail_unless(isinstance(prompt, Mapping), spec, f"encode_prompt() must return a mapping, got {prompt!r}")
    prompt_ids = _int_list(prompt.get("input_ids"), "encode_prompt()['input_ids']", spec)
    _fail_unless(prompt_ids, spec, "encode_prompt() returned no input_ids")
    if prompt_is_prefix:
        first_difference = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), None)
        _fail_unless(
            len(prompt_ids) < len(ids) and first_difference is None,
            spec,
            "encode_prompt()'s input_ids do not start encode()'s training sequence "
            + (f"(first difference at token {first_difference})" if first_difference is not None else
               f"({len(prompt_ids)} prompt tokens, {len(ids)} training tokens)")
            + ": the model would be prompted differently from how it was trained",
        )  # fmt: skip
    if sample.images:
        _fail_unless("pixel_values" in prompt, spec, "the prompt has images but encode_prompt() gave no pixel_values")
    _fail_unless(isinstance(encoder.decode(prompt_ids), str), spec, "decode() must return a str")
    return dict(encoded)


# -- adapters ------------------------------------------------------------------------


def _base_name(name: str) -> str:
    """A parameter's name in the unwrapped model (peft adds ``base_model.model.`` and ``.base_layer``)."""
    while name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return name.replace(".base_layer.", ".")


def check_adapter(
    spec: specs.Adapter, model: Any, model_type: specs.ModelType, config: Any, *, base_frozen: bool | None = None
):
    """Apply the adapter to ``model`` (a freshly loaded one: it may be changed in place) and check what it trains.

    Some parameter must be trainable.  An adapter that adds parameters (LoRA, DoRA...)
    promises a frozen base model: no original weight may train, and unless the adapter's
    ``scope`` option is ``all`` (a LoRA option) no added parameter may sit in the vision
    tower or projector, except in a part the config asks to train in full
    (``freeze_vision_tower: false`` / ``freeze_projector: false``), which must then
    train.  An adapter that adds none (full fine-tuning, GaLore) must honour
    ``freeze_vision_tower``, ``freeze_projector`` (null: trained) and
    ``freeze_language_model``.

    :param base_frozen: force one of the two promises instead of deciding by whether
        parameters were added.
    :returns: the model ``apply`` returned.
    """
    _check_spec_type(spec, specs.Adapter)
    _check_requirements(spec)
    check_options(spec)
    original = {name for name, _ in model.named_parameters()}
    apply = _load(spec, "apply")
    trained = apply(model, model_type, config)
    _fail_unless(callable(getattr(trained, "named_parameters", None)), spec, f"apply() returned {trained!r}, not a model")
    params = [(_base_name(name), p) for name, p in trained.named_parameters()]
    trainable = [name for name, p in params if p.requires_grad]
    _fail_unless(trainable, spec, "no parameter is trainable after apply()")
    if base_frozen is None:
        base_frozen = any(name not in original for name, _ in params)
    if base_frozen:
        # parts the config asks to train in full next to the adapter
        full_parts = [part for part in ("vision_tower", "projector") if getattr(config, f"freeze_{part}", None) is False]
        full_prefixes = tuple(prefix for part in full_parts for prefix in getattr(model_type, part))
        trainable_base = [n for n in trainable if n in original and not _under(n, full_prefixes)]
        _fail_unless(not trainable_base, spec,
                     f"{len(trainable_base)} base weight(s) are trainable, e.g. {trainable_base[:3]}")  # fmt: skip
        from vistune.options import option_values

        if option_values(config, spec.name, spec.options).get("scope", "language_model") == "language_model":
            vision = model_type.vision_tower + model_type.projector
            outside = [n for n in trainable if n not in original and _under(n, vision) and not _under(n, full_prefixes)]
            _fail_unless(not outside, spec,
                         f"scope is language_model but {len(outside)} trainable parameter(s) sit in the vision tower "
                         f"or projector, e.g. {outside[:3]}")  # fmt: skip
        for part in full_parts:
            prefixes = getattr(model_type, part)
            _fail_unless(not prefixes or any(_under(n, prefixes) for n in trainable), spec,
                         f"freeze_{part} is false but none of the {part} parameters is trainable")  # fmt: skip
    else:
        trainable_base = [name for name in trainable if name in original]
        for part in ("vision_tower", "projector", "language_model"):
            prefixes = getattr(model_type, part)
            if not prefixes:
                continue
            inside = [n for n in trainable_base if _under(n, prefixes)]
            if getattr(config, f"freeze_{part}"):
                _fail_unless(not inside, spec,
                             f"freeze_{part} is true but {len(inside)} of its weights are trainable, e.g. {inside[:3]}")  # fmt: skip
            else:
                _fail_unless(inside, spec, f"freeze_{part} is false but none of the {part} weights is trainable")
    return trained


# -- algorithms, rewards, backends --------------------------------------------------


def check_algorithm(spec: specs.Algorithm, config: Any):
    """Build the algorithm with ``factory(config)`` and run each of its steps on a toy batch.

    Checks: ``defaults`` are valid config keys and values; ``reads`` names config keys;
    the object has every method and attribute of :class:`vistune.rl.algorithm.RLAlgorithm`;
    ``needs_reference_model()`` is a bool; ``shape_rewards`` keeps the shape and the
    ``NaN`` of a completion no reward applied to; ``select_groups`` gives one bool per
    group; ``advantages`` are finite, also for a group whose rewards are all equal and
    one holding a ``NaN``; ``loss`` returns a :class:`vistune.rl.algorithm.PolicyLoss`
    whose finite scalar gives the policy a finite, non-zero gradient.  An algorithm with
    its own ``pipeline`` (learning from stored data) is checked up to there: the pipeline
    is a callable, and the factory builds what it trains with; its training is its own
    plugin's to test.

    :returns: the algorithm object.
    """
    import torch

    from vistune.config import FIELDS, build_config
    from vistune.rl.algorithm import PolicyBatch, PolicyLoss, RolloutStats

    _check_spec_type(spec, specs.Algorithm)
    check_options(spec)
    unknown = sorted(set(spec.reads) - set(FIELDS))
    _fail_unless(not unknown, spec, f"reads {', '.join(unknown)}, which are not config keys")
    try:
        build_config(dict(spec.defaults), path=f"defaults of algorithm {spec.name!r}")
    except VistuneError as exc:
        raise ContractError(f"Algorithm {spec.name!r}: {exc}") from exc
    factory = _load(spec, "factory")
    algorithm = factory(config)
    _fail_unless(algorithm is not None, spec, "factory(config) returned None")
    if spec.pipeline is not None:
        _fail_unless(callable(_load(spec, "pipeline")), spec, "pipeline is not callable")
        return algorithm
    missing = _missing_members(algorithm, "vistune.rl.algorithm", "RLAlgorithm")
    _fail_unless(not missing, spec, f"the algorithm object lacks RLAlgorithm member(s) {', '.join(missing)}")

    groups, per_group, tokens = 3, 4, 6
    count = groups * per_group
    needs_reference = algorithm.needs_reference_model()
    _fail_unless(isinstance(needs_reference, bool), spec, f"needs_reference_model() returned {needs_reference!r}")
    generator = torch.Generator().manual_seed(0)
    # group 0 varies, group 1 is constant (zero std), group 2 has a completion no reward applied to
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 0.0, float("nan"), 1.0, 0.5])
    lengths = torch.randint(1, tokens + 1, (count,), generator=generator)
    rollout = RolloutStats(completion_lengths=lengths, truncated=lengths == tokens, max_completion_length=tokens,
                           kl=torch.rand(count, generator=generator) if needs_reference else None)  # fmt: skip
    shaped = algorithm.shape_rewards(rewards, rollout)
    _fail_unless(tuple(shaped.shape) == (count,), spec, f"shape_rewards returned shape {tuple(shaped.shape)}, not ({count},)")
    _fail_unless(bool(torch.isnan(shaped[9])), spec, "shape_rewards turned the NaN of an unscored completion into a number")
    grouped = shaped.reshape(groups, per_group)
    keep = algorithm.select_groups(rewards.reshape(groups, per_group))
    _fail_unless(tuple(keep.shape) == (groups,) and keep.dtype == torch.bool, spec,
                 f"select_groups must return ({groups},) bools, got {tuple(keep.shape)} {keep.dtype}")  # fmt: skip
    advantages = algorithm.advantages(grouped)
    _fail_unless(tuple(advantages.shape) == (groups, per_group), spec,
                 f"advantages returned shape {tuple(advantages.shape)}, not ({groups}, {per_group})")  # fmt: skip
    _fail_unless(bool(torch.isfinite(advantages).all()), spec,
                 f"advantages are not all finite (a constant group or a NaN reward must still give finite ones): "
                 f"{advantages.tolist()}")  # fmt: skip

    logps = (-torch.rand(count, tokens, generator=generator) - 0.1).requires_grad_(True)
    mask = (torch.arange(tokens)[None, :] < lengths[:, None]).float()
    batch = PolicyBatch(
        logps=logps, old_logps=logps.detach() + 0.05 * torch.randn(count, tokens, generator=generator),
        ref_logps=logps.detach() - 0.1 if needs_reference else None, mask=mask,
        advantages=torch.nan_to_num(advantages.reshape(count)), num_sequences=count, num_tokens=int(mask.sum()),
        max_completion_length=tokens,
    )  # fmt: skip
    result = algorithm.loss(batch)
    _fail_unless(isinstance(result, PolicyLoss), spec, f"loss() must return a PolicyLoss, got {type(result).__name__}")
    _fail_unless(getattr(result.loss, "numel", lambda: 0)() == 1 and bool(torch.isfinite(result.loss).all()), spec,
                 f"the loss must be a finite scalar tensor, got {result.loss!r}")  # fmt: skip
    result.loss.backward()
    _fail_unless(logps.grad is not None and bool(torch.isfinite(logps.grad).all()) and bool(logps.grad.abs().sum() > 0),
                 spec, "the loss gives the policy's log-probabilities no finite, non-zero gradient")  # fmt: skip
    _fail_unless(all(isinstance(v, (int, float)) for v in result.metrics.values()), spec,
                 f"PolicyLoss.metrics values must be floats: {dict(result.metrics)!r}")  # fmt: skip
    return algorithm


def check_reward(
    spec: specs.Reward,
    prompts: list[Any],
    completions: list[str],
    columns: Mapping[str, list[Any]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> list[float | None]:
    """Build the reward with ``factory(**options)`` (declared options' defaults filled in) and score ``completions``.

    The reward may be a plain or an async callable, called as a run calls it (by keyword,
    see :mod:`vistune.rl.rewards`).  It must return one score per completion, each a
    finite number or ``None`` ("does not apply").

    :param columns: dataset columns, each a list with one value per completion.
    :returns: the scores.
    """
    from vistune.rl.rewards import call_reward

    _check_spec_type(spec, specs.Reward)
    check_options(spec)
    columns = dict(columns or {})
    if len(prompts) != len(completions) or any(len(v) != len(completions) for v in columns.values()):
        raise ContractError("check_reward needs prompts and every column to have one entry per completion")
    factory = _load(spec, "factory")
    # declared options reach the factory with their defaults filled in, as in a run
    reward = factory(**{**{option.name: option.default for option in spec.options}, **dict(options or {})})
    _fail_unless(callable(reward), spec, f"factory() must return a callable, got {reward!r}")
    scores = _run(call_reward(reward, list(prompts), list(completions), **columns))
    _fail_unless(isinstance(scores, (list, tuple)), spec, f"the reward must return a list, got {scores!r}")
    _fail_unless(len(scores) == len(completions), spec,
                 f"the reward returned {len(scores)} score(s) for {len(completions)} completion(s)")  # fmt: skip
    for i, score in enumerate(scores):
        _fail_unless(
            score is None or (isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)),
            spec,
            f"score {i} is {score!r}; each score must be a finite float or None",
        )
    return list(scores)


def check_backend(spec: specs.Backend, model_dir: str | Path, model_type: specs.ModelType, config: Any, *,
                  prompt: Any = "Hello", max_tokens: int = 4):  # fmt: skip
    """Build the engine with ``factory(model_path, model_type, config)`` and generate with it.

    Checks: the requirements are installed; the engine has every method and attribute
    of :class:`vistune.inference.Engine`; ``generate`` answers two greedy requests for
    ``prompt`` (raw text by default; a :class:`vistune.templates.Sample` works too) in
    order, with one completion each of at most ``max_tokens`` tokens and a finish
    reason; ``stream`` gives the same text as ``generate``.  The caller owns the engine
    (close it when done).

    :returns: the engine.
    """
    from vistune.inference import FINISH_LENGTH, FINISH_STOP, GenerationRequest, SamplingParams, collect

    _check_spec_type(spec, specs.Backend)
    check_options(spec)
    _check_spec_type(model_type, specs.ModelType)
    _check_requirements(spec)
    factory = _load(spec, "factory")
    engine = factory(str(model_dir), model_type, config)
    _fail_unless(engine is not None, spec, "factory() returned None")
    missing = _missing_members(engine, "vistune.inference", "Engine")
    _fail_unless(not missing, spec, f"the engine lacks Engine member(s) {', '.join(missing)}")
    _fail_unless(isinstance(engine.max_model_len, int) and engine.max_model_len > 0, spec,
                 f"max_model_len must be a positive int, got {engine.max_model_len!r}")  # fmt: skip

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    requests = [GenerationRequest(prompt, sampling) for _ in range(2)]
    results = engine.generate(requests)
    _fail_unless(isinstance(results, list) and len(results) == 2, spec, f"generate() of 2 requests returned {results!r}")
    for request, result in zip(requests, results):
        _fail_unless(result.request_id == request.request_id, spec, "generate() must return results in request order")
        _fail_unless(len(result.outputs) == 1, spec, f"n=1 gave {len(result.outputs)} completions")
        output = result.outputs[0]
        _fail_unless(isinstance(output.text, str) and 0 < len(output.token_ids) <= max_tokens, spec,
                     f"a completion must be text of 1..{max_tokens} tokens, got {output!r}")  # fmt: skip
        _fail_unless(output.finish_reason in (FINISH_STOP, FINISH_LENGTH), spec,
                     f"finish_reason must be {FINISH_STOP!r} or {FINISH_LENGTH!r}, got {output.finish_reason!r}")  # fmt: skip
        _fail_unless(result.prompt_tokens > 0, spec, "prompt_tokens must count the prompt")
    _fail_unless(results[0].text == results[1].text, spec, "two identical greedy requests gave different text")
    streamed = _run(collect(engine.stream(GenerationRequest(prompt, sampling))))
    _fail_unless(streamed.text == results[0].text, spec,
                 f"stream() gave {streamed.text!r} where generate() gave {results[0].text!r} (greedy)")  # fmt: skip
    return engine


# -- datasets ------------------------------------------------------------------------


def check_dataset(
    spec: specs.Dataset, directory: str | Path | None = None, *, max_records: int = 100,
    options: Mapping[str, Any] | None = None,
) -> list[Sample]:
    """Check that a dataset's local copy has the layout its spec promises and reads as pipelines read it.

    ``directory`` is a local copy (what ``dataset_path`` would point at).  Without one,
    a dataset with a ``builder`` is built into a temporary directory as a run builds it:
    ``builder(directory, spec, options=values)``, the declared options' defaults under
    ``options``, or ``builder(directory, spec)`` for a builder that takes no options
    (:func:`vistune.data.builders.run_builder`); a dataset with neither is only checked for telling users
    where to get it (``hf_repo_id`` or a description).  The first ``max_records``
    records are read with :func:`vistune.data.readers.read_dataset` in the declared
    ``format``: each must parse, have one image per ``<image>`` tag, and its images
    must open (relative paths under ``image_dir``).

    :returns: the samples read (empty for a dataset without a local copy).
    """
    from vistune.data.builders import run_builder
    from vistune.data.locate import DatasetLocation
    from vistune.data.readers import read_dataset
    from vistune.options import values_over_defaults

    _check_spec_type(spec, specs.Dataset)
    check_options(spec)
    unknown = sorted(set(options or {}) - {option.name for option in spec.options})
    _fail_unless(not unknown, spec, f"declares no option {', '.join(unknown)}")
    if directory is None and spec.builder is None:
        _fail_unless(spec.hf_repo_id or spec.description, spec,
                     "has no builder, no hf_repo_id and no description: users cannot learn where to get it")  # fmt: skip
        return []
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="vistune-dataset-")) / spec.name
        _load(spec, "builder")  # a reference that does not import fails as a contract error
        run_builder(spec, directory, values_over_defaults(options or {}, spec.options))
    directory = Path(directory)
    data = directory / spec.data_file  # an empty data_file names the directory itself
    _fail_unless(data.exists(), spec, f"{data} does not exist (data_file {spec.data_file!r} inside {directory})")
    location = DatasetLocation(data, directory / spec.image_dir, spec.format, spec, how="local copy")
    try:
        dataset = read_dataset(location)
        samples = [dataset.read(i) for i in range(min(len(dataset), max_records))]
    except VistuneError as exc:
        raise ContractError(f"Dataset {spec.name!r}: {exc}") from exc
    _fail_unless(samples, spec, f"{data} holds no records")
    return samples


# -- data formats --------------------------------------------------------------------------


def _record_formats_besides(spec: specs.DataFormat, other_formats: Sequence[specs.DataFormat] | None) -> list:
    if other_formats is None:
        from vistune.data.readers import registered_formats

        other_formats = list(registered_formats())
    return [f for f in other_formats if f.name != spec.name and f.detect is not None]


def check_data_format(
    spec: specs.DataFormat,
    records: Sequence[Mapping[str, Any]] | None = None,
    *,
    directory: str | Path | None = None,
    other_formats: Sequence[specs.DataFormat] | None = None,
    bad_records: Sequence[Any] = (),
) -> list[Sample]:
    """Check that a data format reads records as vistune's readers rely on, and detects only its own.

    A source format (``open_source``) is checked for references that load.  A record
    format reads ``records`` (default: its ``example``): each must be detected by its
    ``detect``, by none of ``other_formats`` (default: every registered record format),
    and read into a Sample of system/user/assistant messages with one ``<image>`` tag per
    image, keeping every field outside its ``fields`` as a column of the same name; its
    ``detect`` must claim none of the other formats' examples.  With ``directory`` the
    records' images are opened from there (relative paths), as a dataset's would be.
    Each of ``bad_records`` must raise a DataError whose message starts with ``where``.

    :returns: the samples read (images opened only with ``directory``; empty for a source format).
    """
    from vistune.data.formats import RecordReader
    from vistune.errors import DataError

    _check_spec_type(spec, specs.DataFormat)
    for field in ("read", "detect", "open_source", "detect_source"):
        if getattr(spec, field) is not None:
            _load(spec, field)
    if spec.read is None:
        return []
    records = list(records) if records is not None else [spec.example] if spec.example is not None else []
    _fail_unless(records, spec, "has no example: set DataFormat.example (one record, as its tool documents it) "
                 "or pass records")  # fmt: skip
    others = _record_formats_besides(spec, other_formats)
    detect = _load(spec, "detect") if spec.detect is not None else None
    reader = RecordReader([], spec)
    samples = []
    for i, record in enumerate(records):
        where = f"record {i}"
        if detect is not None:
            _fail_unless(detect(record), spec, f"does not detect its own example ({where}: {record!r})")
        for other in others:
            _fail_unless(not specs.load_ref(other.detect)(record), spec,
                         f"its {where} is claimed by {other.name!r} too, so such records would be ambiguous: make the "
                         "detectors exclude each other")  # fmt: skip
        try:
            sample = reader.read(record, where)
        except DataError as exc:
            raise ContractError(f"DataFormat {spec.name!r} refused its {where}: {exc}") from exc
        tags = sum(m["content"].count(IMAGE_TAG) for m in sample.messages)
        _fail_unless(tags == len(sample.images), spec,
                     f"{where} became {tags} {IMAGE_TAG} tag(s) and {len(sample.images)} image(s)")  # fmt: skip
        for key in record:
            if key not in spec.fields:
                _fail_unless(key in sample.columns, spec, f"drops the field {key!r} of {where}: fields it does not "
                             "read must stay in Sample.columns, where rewards find them (or list it in fields)")  # fmt: skip
        samples.append(sample)
    if detect is not None:
        for other in others:
            if other.example is not None:
                _fail_unless(not detect(other.example), spec,
                             f"claims records of {other.name!r} too (its example), so they would be ambiguous")  # fmt: skip
    for i, record in enumerate(bad_records):
        where = f"bad record {i}"
        try:
            reader.read(record, where)
        except DataError as exc:
            _fail_unless(exc.message.startswith(where), spec,
                         f"an error must start with where ({where!r}), got {exc.message!r}")  # fmt: skip
            continue
        except Exception as exc:
            raise ContractError(f"DataFormat {spec.name!r} raised {type(exc).__name__} on {where} ({exc}); raise "
                                "vistune.errors.DataError naming where and the field") from exc  # fmt: skip
        raise ContractError(f"DataFormat {spec.name!r} read {where} {record!r} without an error")
    if directory is not None:
        samples = _read_with_images(spec, records, Path(directory))
    return samples


def _read_with_images(spec: specs.DataFormat, records: list, directory: Path) -> list[Sample]:
    """``records`` read as a dataset in ``spec``'s format whose images live in ``directory``."""
    import json

    from vistune.data.locate import DatasetLocation
    from vistune.data.readers import read_dataset
    from vistune.registry import Owner, Registry

    formats = Registry("formats", specs.DataFormat)
    formats.add(spec, Owner("contract-check", "(test)"))
    with tempfile.TemporaryDirectory(prefix="vistune-format-") as tmp:
        path = Path(tmp) / "records.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        try:
            dataset = read_dataset(DatasetLocation(path, directory, spec.name), formats=formats)
            return [dataset.read(i) for i in range(len(dataset))]
        except VistuneError as exc:
            raise ContractError(f"DataFormat {spec.name!r}: {exc}") from exc
