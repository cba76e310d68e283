"""Rollouts: prompts in, groups of sampled completions out, and their tokens' log-probabilities.

Completions are sampled through the inference :class:`vistune.inference.Engine`
interface.  The ``transformers`` backend is an engine over the policy itself
(``TransformersEngine.from_model``), so it always samples from the current weights.
Another backend can serve rollouts when its engine class offers a
``from_model(model, processor, encoder, *, max_batch_size, config)`` constructor (``config``
is the run's :class:`vistune.config.RunConfig`); if that engine keeps its own copy of the
weights it must also offer ``update_weights(model)``, which the trainer calls before every
rollout but the first (``from_model`` starts in step with the policy).

Log-probabilities are computed by one forward pass of the model over
``[left-padded prompt | right-padded completion]`` rows, with the same position ids
the engine generated with (positions count real tokens only; Qwen-VL's 3-D positions
come from the model itself), so a padded row scores exactly as the unpadded sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from vistune.errors import ConfigError, DataError
from vistune.templates import Sample

__all__ = [
    "Group",
    "PromptDataset",
    "completion_logps",
    "generate_groups",
    "image_placeholder_ids",
    "make_engine",
    "policy_inputs",
    "prompt_of",
]

#: Keys of an encoded prompt that are not model inputs, or that are rebuilt for the full rows.
_NOT_COPIED = ("input_ids", "labels", "attention_mask", "position_ids")


def prompt_of(record: Sample) -> Sample:
    """The prompt of a dataset record for RL.

    A conversation that ends with an assistant answer is cut before it, and the answer
    is given to the rewards as the ``answer`` column (unless the record has its own
    ``answer``): a captioning or SFT dataset serves RL as it is, its answers as references.
    """
    messages = list(record.messages)
    if not any(m.get("role") == "user" for m in messages if isinstance(m, dict)):
        raise DataError(f"{record.source or 'a record'}: no user message, so there is no prompt to answer")
    columns = dict(record.columns)
    if messages and messages[-1].get("role") == "assistant":
        answer = messages.pop()
        columns.setdefault("answer", answer.get("content"))
    return Sample(messages=messages, images=list(record.images), columns=columns, source=record.source)


class PromptDataset:
    """``dataset[i]`` is :func:`prompt_of` the ``i``-th record (read lazily)."""

    def __init__(self, records: Sequence[Sample]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return prompt_of(self.records[index])


@attrs.define
class Group:
    """One prompt and the ``n`` completions sampled for it, with what the trainer computes for them."""

    prompt: Sample
    #: ``encoder.encode_prompt(prompt)``: token ids and image tensors.
    encoded: dict[str, Any]
    completion_ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]
    #: reward name -> one unweighted score (or None) per completion.
    scores: dict[str, list[float | None]] = attrs.field(factory=dict)
    #: ``(n,)`` weighted totals, ``NaN`` where no reward applied.
    rewards: Any = None
    #: ``(n,)`` the totals as the algorithm shaped them, and the advantages computed from those.
    shaped: Any = None
    advantages: Any = None
    #: When needed: per completion, a 1-D tensor of its tokens' log-probabilities under the sampling
    #: and under the reference policy.
    old_logps: Any = None
    ref_logps: Any = None

    @property
    def size(self) -> int:
        return len(self.completion_ids)


def engine_factory(backend: Any) -> Any:
    """``from_model(model, processor, encoder, *, max_batch_size, config)`` of the backend's engine class.

    :raises ConfigError: when the backend cannot sample from an in-memory policy.
    """
    from vistune.specs import load_ref

    if backend is None:  # the default backend's engine
        from vistune.inference.transformers_engine import TransformersEngine

        return TransformersEngine.from_model
    from_model = getattr(load_ref(backend.factory), "from_model", None)
    if not callable(from_model):
        raise ConfigError(
            f"backend {backend.name!r} cannot sample RL rollouts from the policy being trained: its engine has no "
            "from_model(model, processor, encoder, *, max_batch_size, config) constructor",
            hint="set backend: transformers for rl",
        )
    return from_model


def make_engine(backend: Any, model: Any, processor: Any, encoder: Any, max_batch_size: int, config: Any) -> Any:
    """An engine sampling from ``model`` for the plan's backend spec (see the module docstring)."""
    return engine_factory(backend)(model, processor, encoder, max_batch_size=max_batch_size, config=config)


def generate_groups(
    engine: Any,
    encoder: Any,
    prompts: Sequence[Sample],
    sampling: Any,
    *,
    adapter: str | None = None,
) -> list[Group]:
    """Sample ``sampling.n`` completions for each prompt; one :class:`Group` per prompt, in order."""
    from vistune.inference import FINISH_LENGTH, GenerationRequest

    requests = []
    for i, prompt in enumerate(prompts):
        seeded = sampling if sampling.seed is None else attrs.evolve(sampling, seed=sampling.seed + i * sampling.n)
        requests.append(GenerationRequest(prompt, seeded, adapter=adapter))
    results = engine.generate(requests)
    groups = []
    for prompt, result in zip(prompts, results):
        outputs = sorted(result.outputs, key=lambda o: o.index)
        groups.append(
            Group(
                prompt=prompt,
                encoded=dict(encoder.encode_prompt(prompt)),
                completion_ids=[list(o.token_ids) for o in outputs],
                texts=[o.text for o in outputs],
                truncated=[o.finish_reason == FINISH_LENGTH for o in outputs],
            )
        )
    return groups


def _rope_owner(model: Any) -> Any:
    """The module computing Qwen-VL's 3-D positions, or None for models with 1-D positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)
    return next((m for m in base.modules() if hasattr(m, "rope_deltas") and hasattr(m, "get_rope_index")), None)


def image_placeholder_ids(model: Any) -> set[int]:
    """Token ids that stand for image (or video) features in ``model``'s inputs."""
    config = getattr(model, "config", None)
    ids: set[int] = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for name in ("image_token_id", "image_token_index", "video_token_id"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                ids.add(value)
    return ids


def policy_inputs(groups: Sequence[Group], pad_id: int, model: Any) -> dict[str, Any]:
    """``model``'s inputs for every completion of ``groups``: ``[prompt | completion]`` rows.

    Returns the forward keyword arguments, on the model's device, plus ``completion_ids``
    and ``completion_mask`` ``(B, T)``.  A completion in which the model sampled an image
    placeholder token is scored only up to that token (see below).  Prompts are left-padded, completions right-padded;
    per-token prompt inputs (Qwen-VL's ``mm_token_type_ids``) are padded with 0 and
    extended with 0 over the completion; image tensors are repeated for each of a
    group's completions, in row order, in the dtype of the model's weights.
    """
    import torch

    from vistune.data.collate import pad_tensors

    first = next(model.parameters())
    device = first.device
    # the first floating weight's: a 4-bit model's quantized weights are stored as integers
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), first.dtype)
    rows = [(group, i) for group in groups for i in range(group.size)]
    prompt_len = max(len(group.encoded["input_ids"]) for group in groups)
    completion_len = max(len(group.completion_ids[i]) for group, i in rows)
    batch = len(rows)
    input_ids = torch.full((batch, prompt_len + completion_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, prompt_len + completion_len), dtype=torch.long)
    completion_ids = torch.full((batch, completion_len), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, completion_len), dtype=torch.float32)
    token_keys = [
        key
        for key, value in groups[0].encoded.items()
        if key not in _NOT_COPIED and isinstance(value, list) and len(value) == len(groups[0].encoded["input_ids"])
    ]  # fmt: skip
    per_token = {key: torch.zeros((batch, prompt_len + completion_len), dtype=torch.long) for key in token_keys}
    tensors: dict[str, list[Any]] = {}
    placeholders = image_placeholder_ids(model)
    for row, (group, i) in enumerate(rows):
        prompt = group.encoded["input_ids"]
        start = prompt_len - len(prompt)
        scored = group.completion_ids[i]  # the tokens whose log-probabilities are computed
        fed = list(scored)  # the tokens the model reads
        cut = next((k for k, token in enumerate(scored) if token in placeholders), None)
        if cut is not None:
            # A sampled image placeholder would make the model look for an image that is not there: the
            # completion is scored up to and including that token, which enters the model as padding.
            scored = scored[: cut + 1]
            fed = scored[:cut] + [pad_id]
        input_ids[row, start:prompt_len] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_len : prompt_len + len(scored)] = torch.tensor(fed, dtype=torch.long)
        attention_mask[row, start : prompt_len + len(scored)] = 1
        completion_ids[row, : len(scored)] = torch.tensor(scored, dtype=torch.long)
        completion_mask[row, : len(scored)] = 1.0
        for key in token_keys:
            per_token[key][row, start:prompt_len] = torch.tensor(group.encoded[key], dtype=torch.long)
        for key, value in group.encoded.items():
            if key in _NOT_COPIED or key in token_keys or value is None:
                continue
            tensors.setdefault(key, []).append(torch.as_tensor(value))
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, **per_token}
    for key, values in tensors.items():
        inputs[key] = pad_tensors(values)
    multimodal_positions = _rope_owner(model) is not None and "image_grid_thw" in inputs
    if not multimodal_positions:
        # the engine's positions: real tokens counted from 0 whatever the left padding
        inputs["position_ids"] = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    for key, value in inputs.items():
        value = value.to(device)
        inputs[key] = value.to(dtype) if value.is_floating_point() else value
    inputs["completion_ids"] = completion_ids.to(device)
    inputs["completion_mask"] = completion_mask.to(device)
    return inputs


def completion_logps(model: Any, inputs: dict[str, Any], temperature: float = 1.0) -> Any:
    """``(B, T)`` log-probabilities of the completion tokens under ``model`` (sampling temperature applied).

    Positions past a completion's end hold garbage; multiply by ``completion_mask``.
    """
    from trl.trainer.utils import selective_log_softmax

    completion_ids = inputs["completion_ids"]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("completion_ids", "completion_mask")}
    keep = completion_ids.shape[1]
    rope_owner = _rope_owner(model)
    if rope_owner is not None and "position_ids" not in model_inputs:
        rope_owner.rope_deltas = None  # positions are computed afresh from the attention mask for these rows
    output = model(**model_inputs, logits_to_keep=keep + 1, use_cache=False)
    logits = output.logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    return selective_log_softmax(logits, completion_ids)
