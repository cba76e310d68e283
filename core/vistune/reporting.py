"""Where training metrics go (``report_to``): vistune's own files, or transformers' integrations.

``jsonl`` and ``tensorboard`` are written by vistune itself into ``output_dir``
(:mod:`vistune.training.metrics`).  Every other name is one of transformers' ``report_to``
integrations (wandb, mlflow, comet_ml, ...): it is handed to ``TrainingArguments.report_to``,
so the Trainer creates that integration's own callback, configured by its usual environment
variables (``WANDB_PROJECT``, ``MLFLOW_TRACKING_URI``, ...).  ``none`` turns every sink off.

The plan checks each name and the package it needs before anything loads: a logger that
is not installed would otherwise stop the run only when the Trainer is built.  Nothing here
imports transformers, so ``--dry-run`` stays fast.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

#: Sinks vistune writes itself (TensorBoard events under output_dir/tensorboard).
OWN_SINKS = ("jsonl", "tensorboard")
NONE = "none"

#: transformers' integrations (``transformers.integrations.INTEGRATION_TO_CALLBACK``, less tensorboard,
#: which vistune writes itself): the modules each callback imports, with the pip package of each.
INTEGRATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "azure_ml": (("azureml.core", "azureml-core"),),
    "clearml": (("clearml", "clearml"),),
    "codecarbon": (("codecarbon", "codecarbon"),),
    "comet_ml": (("comet_ml", "comet-ml"),),
    "dagshub": (("dagshub", "dagshub"), ("mlflow", "mlflow")),
    "dvclive": (("dvclive", "dvclive"),),
    "flyte": (("flytekit", "flytekit"), ("flytekitplugins.deck", "flytekitplugins-deck-standard")),
    "kubeflow": (),
    "mlflow": (("mlflow", "mlflow"),),
    "neptune": (("neptune", "neptune"),),
    "swanlab": (("swanlab", "swanlab"),),
    "trackio": (("trackio", "trackio"),),
    "wandb": (("wandb", "wandb"),),
}
#: Integrations that need an environment variable instead of a package.
REQUIRED_ENV = {"kubeflow": "KUBEFLOW_TRAINER_SERVER_URL"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def problems(names: list[str]) -> list[tuple[str, str]]:
    """``(message, hint)`` for each name that is unknown, or whose package or variable is missing."""
    found = []
    if NONE in names and len(names) > 1:
        found.append((f"none turns every sink off, so it cannot be listed with {', '.join(n for n in names if n != NONE)}",
                      "write report_to: none alone, or leave none out"))  # fmt: skip
    known = [*OWN_SINKS, NONE, *INTEGRATIONS]
    for name in names:
        if name in OWN_SINKS or name == NONE:
            continue
        if name not in INTEGRATIONS:
            close = difflib.get_close_matches(name, known, n=1)
            found.append((f"{name!r} is not a metric sink" + (f" (did you mean {close[0]!r}?)" if close else ""),
                          f"use {', '.join(known)}"))  # fmt: skip
            continue
        missing = [package for module, package in INTEGRATIONS[name] if not _installed(module)]
        if missing:
            found.append((f"{name} logs through the {' and '.join(missing)} package(s), which are not installed",
                          f"pip install {' '.join(missing)}, or remove {name} from report_to"))  # fmt: skip
        variable = REQUIRED_ENV.get(name)
        if variable and not os.environ.get(variable):
            found.append((f"{name} logs to the server that {variable} names, and it is not set",
                          f"export {variable}=URL, or remove {name} from report_to"))  # fmt: skip
    return found


def trainer_integrations(names: list[str]) -> list[str] | str:
    """``TrainingArguments.report_to`` for ``names``: the integrations among them, or ``"none"``."""
    chosen = [name for name in names if name in INTEGRATIONS]
    return chosen or NONE
