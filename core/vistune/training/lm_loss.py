"""The causal LM loss, computed only where there is something to predict.

A multimodal SFT sample is mostly image and prompt tokens whose labels are -100; the
model's own loss still projects every position onto the vocabulary (32k-152k logits
per token, upcast to float32) and then throws most of them away.  Here the model is
asked for the logits of the positions that predict a label only (transformers'
``logits_to_keep``), and the cross-entropy runs on those.  The value is the same as
the model's own loss: the sum of token losses divided by ``num_items_in_batch`` (the
Trainer's count over the whole accumulation window) or by the number of targets.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from vistune.templates import IGNORE_INDEX


def _unwrap(model: Any) -> Any:
    model = getattr(model, "module", model)  # DDP
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)  # torch.compile


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (transformers' causal LM heads do)."""
    try:
        return "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> tuple[torch.Tensor, Any]:
    """``(loss, outputs)`` of a causal LM batch with ``labels``; ``outputs.logits`` holds the kept positions only.

    :param model: a model whose forward takes ``logits_to_keep`` (:func:`accepts_logits_to_keep`).
    :param inputs: the batch as the Trainer passes it (``labels`` included; not modified).
    :param num_items_in_batch: the Trainer's target count for loss normalisation, or None.
    """
    labels = inputs["labels"]
    rest = {key: value for key, value in inputs.items() if key != "labels"}
    shift = labels[..., 1:]
    keep = (shift != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)  # nothing to predict: loss 0, graph kept
    outputs = model(**rest, logits_to_keep=keep)
    logits = outputs.logits
    targets = shift.index_select(-1, keep).to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")  # fmt: skip
    count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=total.device).clamp(min=1)  # a batch without targets: loss 0, not NaN
    loss = total / count
    outputs.loss = loss
    return loss, outputs
