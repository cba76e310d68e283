"""Qwen-VL's 3D rotary positions (mrope) for one sample, as the model itself computes them.

Packing several samples into one row needs each sample's positions computed on its
own and then concatenated (the model, given a packed row, would number it as one long
sample).  The model's ``get_rope_index`` does the computation; in transformers 5 it
lives on the inner ``Qwen2VLModel`` / ``Qwen2_5_VLModel`` (``model.model``).
"""

from __future__ import annotations

import inspect
from typing import Any


def _rope_owner(model: Any) -> Any:
    """The (sub)module that defines ``get_rope_index``, looking through peft and DDP wrappers."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    model = getattr(model, "module", model)
    for module in model.modules():
        if callable(getattr(module, "get_rope_index", None)):
            return module
    raise TypeError(f"{type(model).__name__} has no get_rope_index(): it is not a Qwen2-VL / Qwen2.5-VL model")


def mrope_position_ids(model: Any, input_ids: Any, image_grid_thw: Any = None, mm_token_type_ids: Any = None) -> Any:
    """Position ids of shape ``(3, L)`` (temporal, height, width) for ONE sample.

    :param model: a Qwen2-VL or Qwen2.5-VL model (peft-wrapped is fine); only its
        config and ``get_rope_index`` are used, so it may live on any device.
    :param input_ids: the sample's ``L`` token ids (list or 1-D tensor), images expanded.
    :param image_grid_thw: ``(n_images, 3)`` grids of the sample's images, or None.
    :param mm_token_type_ids: per-token modality (0 text, 1 image, 2 video); derived from
        the image and video placeholder ids when not given.
    :returns: a ``torch.LongTensor`` on the device of ``input_ids``.  A packed row's
        ``position_ids`` are ``(4, 1, L_total)``: row 0 text positions restarting at 0
        for each sample, rows 1-3 these tensors concatenated along the last dimension.
    """
    import torch

    owner = _rope_owner(model)
    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
    grid = None if image_grid_thw is None else torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3)
    if grid is not None and grid.numel() == 0:
        grid = None
    kwargs: dict[str, Any] = {"image_grid_thw": grid}
    if "mm_token_type_ids" in inspect.signature(owner.get_rope_index).parameters:
        if mm_token_type_ids is None:
            config = owner.config
            types = torch.zeros_like(ids, dtype=torch.int)
            types[ids == config.image_token_id] = 1
            types[ids == config.video_token_id] = 2
        else:
            types = torch.as_tensor(mm_token_type_ids, dtype=torch.int).reshape(1, -1)
        kwargs["mm_token_type_ids"] = types.to(ids.device)
    positions, _ = owner.get_rope_index(ids, **kwargs)
    return positions[:, 0].to(torch.long)
