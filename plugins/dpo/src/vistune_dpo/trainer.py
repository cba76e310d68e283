"""The preference trainer: vistune's Trainer with a preference objective's loss.

Per batch it computes, for every answer, the sum of its tokens' log-probabilities and
its token count under the policy and, when the objective needs them, under the
reference model, and hands them to the objective (:mod:`vistune_dpo.objectives`).

- One forward per batch: the ``2B`` sequences of ``B`` pairs go through the model
  together.  The images go through the vision tower once per pair: their features are
  computed once and given to both answers through transformers' ``mm_encoder_outputs``
  (models without it get the pixels twice).
- Only the positions that predict an answer token are projected onto the vocabulary
  (``logits_to_keep``), as in vistune's SFT loss.
- The reference: under a peft adapter, the same model with the adapter disabled (no copy
  of the weights); otherwise a frozen copy, or nothing at all when the reference
  log-probabilities are computed once before training (``precompute_ref_log_probs``).
- Logged next to the loss: TRL's ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected`` (and per
  algorithm ``nll_loss``, ``kl``, ...), averaged over the steps of each log.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from vistune.rl.trainer import reference_model
from vistune.templates import IGNORE_INDEX
from vistune.training.trainer import VistuneTrainer
from vistune_dpo.batches import IMAGE_KEYS, KL_PREFIX
from vistune_dpo.objectives import SequenceLogps

#: Batch keys that are not model inputs.
NOT_MODEL_INPUTS = ("labels", "index", "label")


def token_inputs(batch: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The per-token model inputs of ``batch`` (``input_ids``, ``attention_mask``, Qwen-VL's ``mm_token_type_ids``...),
    without labels and images; ``prefix`` selects the KL sequences' (``kl_``)."""
    chosen = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)} if prefix else {
        k: v for k, v in batch.items() if not k.startswith(KL_PREFIX)}
    return {k: v for k, v in chosen.items() if k not in NOT_MODEL_INPUTS and k not in IMAGE_KEYS}


def unwrap(model: Any) -> Any:
    """The transformers model under DDP, peft and torch.compile wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "_orig_mod", model)


def shares_image_features(model: Any) -> bool:
    """Whether the model takes precomputed image features (``mm_encoder_outputs``) and computes them itself."""
    base = unwrap(model)
    try:
        return hasattr(base, "get_image_features") and "mm_encoder_outputs" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def image_inputs(model: Any, batch: dict[str, Any], copies: int, features: Any = None) -> dict[str, Any]:
    """Model keywords for ``copies`` sequences per set of images in ``batch``.

    With ``features`` (from :func:`image_features`), the images are not encoded again.
    """
    images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    if not images:
        return {}
    repeated = {k: torch.cat([v] * copies) for k, v in images.items() if k != "pixel_values"}
    if features is None:
        if copies == 1:
            return images
        return {**repeated, "pixel_values": torch.cat([images["pixel_values"]] * copies)}
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    pooled = list(features.pooler_output) * copies
    return {**repeated, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=pooled)}}


def image_features(model: Any, batch: dict[str, Any]) -> Any:
    """The batch's images through the vision tower and projector once, or None when the model cannot share them."""
    images = {k: batch[k] for k in IMAGE_KEYS if k in batch}
    if not images or not shares_image_features(model):
        return None
    return unwrap(model).get_image_features(**images, return_dict=True)


def sequence_logps(model: Any, inputs: dict[str, Any], labels: Any, extra: dict[str, Any]) -> SequenceLogps:
    """Per-row sums of the labelled tokens' log-probabilities, and their counts.

    ``inputs`` are the per-token model inputs (:func:`token_inputs`), ``extra`` the image
    inputs.  Only the positions that predict a labelled token are projected onto the vocabulary.
    """
    shift = labels[:, 1:]
    keep = (shift != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    if keep.numel() == 0:
        keep = torch.zeros(1, dtype=torch.long, device=labels.device)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False, **extra)
    logits = outputs.logits.float()
    targets = shift.index_select(1, keep).to(logits.device)
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.clamp(min=0).reshape(-1),
                                   reduction="none").view_as(targets)  # fmt: skip
    return SequenceLogps((token_logps * mask).sum(dim=1), mask.sum(dim=1))


class PreferenceTrainer(VistuneTrainer):
    """:class:`vistune.training.trainer.VistuneTrainer` training on a preference objective.

    :param objective: a :class:`vistune_dpo.objectives.PreferenceObjective`.
    :param ref_model: a frozen reference model, or None (adapter disabled, or precomputed).
    :param ref_adapter: name of a frozen peft adapter holding the reference (training on
        from an SFT adapter), or None.
    """

    def __init__(self, *args: Any, objective: Any, ref_model: Any = None, ref_adapter: str | None = None,
                 **kwargs: Any):  # fmt: skip
        self.objective = objective
        self.ref_model = ref_model
        self.ref_adapter = ref_adapter
        #: Split ("train", "eval") -> ``(len(dataset), 2)`` reference log-probability sums (chosen,
        #: rejected), when precomputed.
        self.precomputed: dict[str, Any] = {}
        self._logged: dict[str, list[float]] = defaultdict(list)
        self._images_trainable: bool | None = None
        super().__init__(*args, **kwargs)
        # the loss is a mean per micro-batch: the Trainer divides it by the accumulation steps
        self.model_accepts_loss_kwargs = False

    # -- reference ---------------------------------------------------------------------

    def reference(self):
        """A context giving the reference model (eval mode): the frozen copy, the frozen adapter or the adapter disabled."""
        return reference_model(self.accelerator.unwrap_model(self.model), self.ref_model, self.ref_adapter)

    def precompute_reference(self, dataset: Any, batch_size: int, split: str = "train") -> None:
        """Compute every pair's reference log-probabilities of ``dataset`` once, in order, before training starts."""
        from torch.utils.data import DataLoader

        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=self.data_collator)
        table = torch.zeros(len(dataset), 2)
        with torch.no_grad(), self.reference() as model:
            device = next(model.parameters()).device
            for batch in loader:
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                ref = self._paired_logps(model, batch)
                chosen, rejected = ref.halves()
                table[batch["index"].cpu()] = torch.stack([chosen.sums, rejected.sums], dim=1).float().cpu()
        self.precomputed[split] = table

    # -- loss --------------------------------------------------------------------------

    def _paired_logps(self, model: Any, batch: dict[str, Any], features: Any = None) -> SequenceLogps:
        if features is None:
            features = image_features(model, batch)
        extra = image_inputs(model, batch, copies=2, features=features)
        return sequence_logps(model, token_inputs(batch), batch["labels"], extra)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.objective.paired:
            loss, metrics = self._paired_loss(model, inputs)
        else:
            loss, metrics = self._unpaired_loss(model, inputs)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._logged[f"{mode}:{key}"].append(value)
        return (loss, {}) if return_outputs else loss

    def _reuse(self, features: Any) -> Any:
        """The policy's image features when the reference computes the same: no trainable weight made them.

        (Their ``requires_grad`` cannot tell: input-gradient hooks set it on frozen towers too.)
        """
        if features is None or self.ref_model is not None:
            return None
        if self._images_trainable is None:
            spec = self.model_type
            prefixes = tuple(getattr(spec, "vision_tower", ())) + tuple(getattr(spec, "projector", ()))
            base = unwrap(self.model)
            self._images_trainable = not prefixes or any(
                p.requires_grad for name, p in base.named_parameters() if name.startswith(prefixes))
        return None if self._images_trainable else features

    def _paired_loss(self, model, inputs):
        features = image_features(model, inputs)
        policy = self._paired_logps(model, inputs, features)
        reference = None
        if self.objective.needs_reference:
            table = self.precomputed.get("train" if model.training else "eval")
            if table is not None:
                ref = table[inputs["index"].cpu()].to(policy.sums.device, policy.sums.dtype)
                reference = SequenceLogps(torch.cat([ref[:, 0], ref[:, 1]]), policy.counts)
            else:
                with torch.no_grad(), self.reference() as ref_model:
                    shared = self._reuse(features)
                    reference = self._paired_logps(ref_model, inputs, shared)
        return self.objective.loss(policy, reference)

    def _unpaired_loss(self, model, inputs):
        features = image_features(model, inputs)
        extra = image_inputs(model, inputs, copies=1, features=features)
        main, kl_inputs = token_inputs(inputs), token_inputs(inputs, KL_PREFIX)
        kl_labels = inputs[f"{KL_PREFIX}labels"]
        policy = sequence_logps(model, main, inputs["labels"], extra)
        with torch.no_grad():
            kl_policy = sequence_logps(model, kl_inputs, kl_labels, extra)
            with self.reference() as ref_model:
                shared = self._reuse(features)
                ref_extra = image_inputs(ref_model, inputs, copies=1,
                                         features=shared if shared is not None else image_features(ref_model, inputs))  # fmt: skip
                reference = sequence_logps(ref_model, main, inputs["labels"], ref_extra)
                kl_reference = sequence_logps(ref_model, kl_inputs, kl_labels, ref_extra)
        return self.objective.loss(policy, reference, labels=inputs["label"], kl_policy=kl_policy,
                                   kl_reference=kl_reference)  # fmt: skip

    # -- logging -----------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the objective's metrics, averaged since the last log and over processes (``eval_`` prefixed in evaluation)."""
        evaluating = any(key.startswith("eval_") for key in logs)
        mode = "eval" if evaluating else "train"
        prefix = "eval_" if evaluating else ""
        keys = sorted(k for k in self._logged if k.startswith(f"{mode}:"))  # the same on every process
        means = []
        for key in keys:
            values = [v for v in self._logged.pop(key) if v == v]  # NaN: a batch without that kind of answer
            means.append(sum(values) / len(values) if values else float("nan"))
        if keys and self.accelerator.num_processes > 1:
            gathered = self.accelerator.gather(torch.tensor(means, device=self.accelerator.device).unsqueeze(0))
            means = gathered.float().nanmean(dim=0).tolist()
        for key, mean in zip(keys, means):
            if mean == mean:
                logs[prefix + key.split(":", 1)[1]] = mean
        super().log(logs, start_time)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the objective's loss (and metrics) on held-out preference data."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
