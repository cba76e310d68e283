"""GaLore: full-rank training whose optimizer keeps low-rank projections of the gradients.

The model trains like full fine-tuning (same freeze options); the saving is in the
optimizer state, which transformers' ``galore_adamw`` optimizer (from the
``galore-torch`` package) keeps in a rank-``rank`` subspace (``galore: {rank: 128}``)
for the linear layers of the trained parts.  The Trainer must be told: the adapter's
spec names :func:`trainer_overrides`, which the pipelines merge into their
``TrainingArguments``.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Any

from vistune.adapters.full import set_trainable_parts
from vistune.adapters.options import galore_options
from vistune.adapters.targets import OUTPUT_LAYERS, PARTS, frozen_parts
from vistune.errors import VistuneError

#: transformers' name for GaLore-projected AdamW.
OPTIMIZER = "galore_adamw"


def _require_galore() -> None:
    if importlib.util.find_spec("galore_torch") is None:
        raise VistuneError("adapter galore needs the galore-torch package, which is not installed",
                           hint="pip install galore-torch")  # fmt: skip


def apply_galore(model: Any, model_type: Any, config: Any) -> Any:
    """Set the trainable parts as full fine-tuning does; the optimizer does the rest."""
    _require_galore()
    set_trainable_parts(model, model_type, config)
    return model


def target_modules_regex(config: Any, model_type: Any) -> str:
    """A regex (``re.fullmatch`` on module names) for the linear layers GaLore projects.

    Every module inside a trained part, except output layers and frozen parts nested
    in a trained one; transformers keeps only the ``nn.Linear`` modules among them.
    Frozen weights get no gradient, so the optimizer skips them anyway.
    """
    frozen = set(frozen_parts(config))
    trained = [part for part in PARTS if part not in frozen]
    allowed = [prefix for part in trained for prefix in getattr(model_type, part)]
    excluded = [prefix for part in frozen for prefix in getattr(model_type, part)]
    if "language_model" in trained and not model_type.language_model:
        body = ".+"  # text models: the language model is everything not named otherwise
    else:
        # a frozen part nested inside a trained one (a projector inside the vision tower) stays out
        excluded = [e for e in excluded if any(e.startswith(a + ".") for a in allowed)]
        body = "(?:" + "|".join(map(re.escape, allowed)) + r")(?:\..+)?"
    not_excluded = "".join(rf"(?!{re.escape(e)}(?:\.|$))" for e in excluded)
    not_output = r"(?!(?:.*\.)?(?:" + "|".join(map(re.escape, OUTPUT_LAYERS)) + r")$)"
    return "^" + not_excluded + not_output + body + "$"


def trainer_overrides(config: Any, model_type: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords that make the Trainer build the GaLore optimizer.

    :returns: ``optim``, ``optim_target_modules`` and ``optim_args`` (rank, projection
        update gap and scale from the adapter's options ``rank``, ``update_proj_gap``, ``scale``).
    """
    options = galore_options(config)
    return {
        "optim": OPTIMIZER,
        "optim_target_modules": target_modules_regex(config, model_type),
        "optim_args": f"rank={options['rank']},update_proj_gap={options['update_proj_gap']},scale={options['scale']}",
    }
