"""Loader of ``llava-deep-features``: a Llava checkpoint whose projector also gets the last vision layer.

Llava-1.5 feeds its projector the second-to-last layer of the CLIP tower.  This variant
concatenates that layer with the last one (transformers' Llava supports a list in
``vision_feature_layer``), which doubles the projector's input width.  The new input
columns of the projector's first linear layer start at zero, so the loaded model
computes exactly what the checkpoint did; fine-tuning then learns how much of the last
layer to use.  The result saves as a plain Llava checkpoint (``vision_feature_layer``
is a list in its ``config.json``) that transformers loads without vistune.
"""

from __future__ import annotations

from typing import Any

from vistune.models import LoadOptions
from vistune_llava.loading import load_llava_model

LAST_LAYER = -1


def feature_layers(config: Any) -> list[int]:
    """The vision layers whose features the projector takes, as a list."""
    layer = config.vision_feature_layer
    return [layer] if isinstance(layer, int) else list(layer)


def widen_projector(model: Any, extra_layers: int) -> None:
    """Give the projector's first linear layer ``extra_layers`` more vision-width input blocks, set to zero."""
    import torch

    projector = model.model.multi_modal_projector
    old = projector.linear_1
    width = model.config.vision_config.hidden_size
    new = torch.nn.Linear(old.in_features + extra_layers * width, old.out_features, bias=old.bias is not None)
    new.to(device=old.weight.device, dtype=old.weight.dtype).train(old.training)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_features] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    projector.linear_1 = new


def load_llava_deep_features(path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Load a Llava checkpoint as ``llava-deep-features``; one saved by this variant loads as it is.

    The projector is never quantized (the llava plugin keeps it in full precision), so
    it can be widened whatever ``options.quantization`` says.
    """
    model, processor = load_llava_model("llava", path, options)
    layers = feature_layers(model.config)
    if LAST_LAYER in layers:
        return model, processor  # already the variant (or a checkpoint that uses the last layer anyway)
    widen_projector(model, extra_layers=1)
    # The config object is shared by the model and its inner LlavaModel, which reads it on every forward.
    model.config.vision_feature_layer = [*layers, LAST_LAYER]
    return model, processor
